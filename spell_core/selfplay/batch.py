"""What the self-play loop hands the trainer: trajectories with their advantages.

A trajectory is one sampled response to one prompt. Trajectories whose prompts are the same
token sequence (the G responder answers to one question, the G verdicts on one answer) are
trained as one shared-prefix group: the prompt is forwarded and back-propagated once.
"""
from dataclasses import dataclass, field

from spell_core.models.routed_tokens import RoutedTokens

ROLES = ("questioner", "responder", "verifier")


@dataclass
class Trajectory:
    role: str                      # one of ROLES
    prompt_ids: list[int]          # the rendered prompt (chat template applied)
    response_ids: list[int]        # the sampled tokens (the only tokens that train)
    old_logprobs: list[float]      # the sampler's log-prob of each response token
    advantage: float               # broadcast to every response token
    reward: float = 0.0
    group: str = ""                # trajectories of one group share prompt_ids (e.g. "resp:<question id>")
    info: dict = field(default_factory=dict)  # task type, cluster id, ... (logging only)
    routing: RoutedTokens | None = field(default=None, compare=False)  # an MoE model's sampled expert ids, for routing replay

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {ROLES}")
        if len(self.old_logprobs) != len(self.response_ids):
            raise ValueError(f"{len(self.response_ids)} response tokens but {len(self.old_logprobs)} log-probs")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)
