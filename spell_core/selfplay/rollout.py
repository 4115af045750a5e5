"""What one generation round produced, before selection: questions, responder groups and
verifier groups, with their rewards. Plain records: the loop fills them, `selection.py`
decides what trains, `loop.py` turns the chosen ones into `Trajectory`s."""
from __future__ import annotations

from dataclasses import dataclass, field

from spell_core.models.routed_tokens import RoutedTokens
from spell_core.roles import Status, Task
from spell_core.roles.rewards import verifier_agreement


@dataclass
class Sample:
    """One generated response (the sampler's token ids and log-probs; an MoE model's expert ids)."""
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"
    routing: RoutedTokens | None = field(default=None, compare=False)


@dataclass
class ResponderGroup:
    """The G responder answers to one question."""
    question_id: str
    prompt_ids: list[int]
    samples: list[Sample]
    answers: list[str | None]  # extracted final answers; None: unparsable
    rule_rewards: list[float]
    majorities: list[int | None]  # verifier majority per answer; None: undecided or not verified
    rewards: list[float]  # r_i = max(R_rule, v_i)

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def has_variance(self) -> bool:
        return max(self.rewards) != min(self.rewards)


@dataclass
class VerifierGroup:
    """The G verifier judgments of one responder answer."""
    question_id: str
    answer_index: int  # which answer of the responder group was judged
    prompt_ids: list[int]
    samples: list[Sample]
    verdicts: list[bool | None]  # True YES, False NO, None unparsable
    majority: int | None
    rule_reward: float  # of the judged answer
    rewards: list[float]  # 1 agrees with the majority, 0 disagrees, -1 unparsable

    @property
    def agreement(self) -> float:
        """Share of the parsable judgments that agree with the majority (0 when undecided)."""
        return verifier_agreement(self.verdicts, self.majority)


@dataclass
class Question:
    """One questioner output and everything that followed from it."""
    id: str
    task_type: str
    cluster_id: str
    evidence_ids: tuple  # the documents the questioner was shown
    prompt_ids: list[int]
    sample: Sample
    status: Status
    task: Task | None = None
    reason: str = ""  # why bad_format / discarded (logs)
    responder: ResponderGroup | None = None
    verifiers: list[VerifierGroup] = field(default_factory=list)
    reward: float | None = None  # questioner reward; None: discarded (no training signal)

    @property
    def zero_variance(self) -> bool:
        return self.responder is not None and not self.responder.has_variance
