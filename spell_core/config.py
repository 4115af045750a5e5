"""Run configuration: nested dataclasses with SPEC.md's defaults, and the `--ctx` parser.

One section per part of the engine (model, data, sampling, …); later issues add their own
sections (self-play loop, rewards, trainer) to `RunConfig` the same way.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from spell_core.assets import DEFAULT_CORPUS, DEFAULT_MODEL

_CTX_PATTERN = re.compile(r"(\d+)([km]?)")
_CTX_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_ctx(text: str | int) -> int:
    """A context length in tokens: `16k` -> 16384, `128k` -> 131072, `131072`, `1m` -> 1048576.

    k and m are binary (1024, 1024²), as context lengths are usually quoted.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _CTX_PATTERN.fullmatch(str(text).strip().lower().replace("_", ""))
        if match is None:
            raise ValueError(
                f"context length {text!r} is not understood: write a whole number of tokens, "
                "optionally with k (×1024) or m (×1024²), e.g. 16k, 128k, 131072 or 1m"
            )
        value = int(match.group(1)) * _CTX_UNITS[match.group(2)]
    if value <= 0:
        raise ValueError(f"context length must be positive, got {text!r}")
    return value


@dataclass
class ModelOptions:
    name: str = DEFAULT_MODEL  # alias (see spell_core.assets) or local HF checkpoint folder
    device: str = "auto"  # auto: cuda when available, else cpu


@dataclass
class DataOptions:
    corpus: str | list[str] = DEFAULT_CORPUS  # alias (spell_core.assets), folder, or table file(s) (corpus_tables)
    text_field: str = "text"  # table corpora: the document column
    cluster_field: str = "cluster"  # table corpora: the column marking related documents
    ctx: int = 16 * 1024  # SPEC: training input 16K tokens
    # room kept free in the context for the role prompt around the documents: instructions,
    # per-document headers, history memory, the question
    prompt_tokens: int = 1024


@dataclass
class SamplingOptions:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0: no top-k
    max_response_tokens: int = 4096
    group_size: int = 8  # G: samples per responder prompt and judgments per answer


@dataclass
class LoopOptions:
    """One self-play step (SPEC.md, "What trains"); G itself is `SamplingOptions.group_size`."""
    questions: int = 128  # questioner prompts per generation round
    kept_groups: int = 128  # N: responder groups with non-zero reward variance to collect
    max_rounds: int = 4  # cap on generation rounds per step when N is not reached
    verifier_group_size: int | None = None  # judgments per responder answer; None: G
    negatives_ratio: float = 1.0  # questioner negatives per positive, per task type
    verifier_share: float = 1.0  # verifier trajectories ≈ this × questioner positives
    agreement_low: float = 0.51  # verifier groups kept when the share of judgments agreeing
    agreement_high: float = 0.99  # with the majority lies in [low, high]
    memory_capacity: int = 3  # L: questions remembered per (cluster, task type)
    new_documents: int = 5  # m: fresh documents shown to the questioner
    # new tokens per role; None: SamplingOptions.max_response_tokens
    questioner_tokens: int | None = None
    grounding_tokens: int | None = None
    responder_tokens: int | None = None
    verifier_tokens: int | None = None
    questioner_reward: str = "gaussian"  # or the ablations "linear" (1 - r), "triangle" (1 - 2|r - 0.5|)
    advantage_eps: float = 1e-6
    kv_budget_tokens: int | None = None  # sampler KV cache size in tokens; None: everything at once


@dataclass
class RunConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    loop: LoopOptions = field(default_factory=LoopOptions)
    out: str = "runs/spell"
    seed: int = 0
    steps: int = 70  # SPEC: ~70 steps in the original
    save_every: int = 10  # checkpoint every this many steps (and always at exit)

    @property
    def cluster_budget(self) -> int:
        """Tokens of documents a cluster may hold: the context minus the prompt and the answer."""
        return cluster_budget(self.data.ctx, self.data.prompt_tokens, self.sampling.max_response_tokens)

    def to_dict(self) -> dict:
        return {**asdict(self), "cluster_budget": self.cluster_budget}


def cluster_budget(ctx: int, prompt_tokens: int, max_response_tokens: int) -> int:
    """cluster budget = ctx − prompt_tokens − max_response_tokens (the responder's whole input
    and output must fit the context)."""
    budget = ctx - prompt_tokens - max_response_tokens
    if budget <= 0:
        raise ValueError(
            f"a context of {ctx} tokens leaves no room for documents: it must exceed the prompt "
            f"room ({prompt_tokens}) plus the maximum response ({max_response_tokens}) = "
            f"{prompt_tokens + max_response_tokens} tokens; raise --ctx"
        )
    return budget
