"""The trainer (policy loss over trajectories) and the train state saved in checkpoints."""
