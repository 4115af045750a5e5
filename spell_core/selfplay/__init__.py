"""The self-play loop: run configuration, rollouts, memory, question selection, data parallel rollouts."""
