"""Run configuration: nested dataclasses with SPEC.md's defaults, and the `--ctx` parser.

One section per part of the engine (model, data, sampling, …); later issues add their own
sections (self-play loop, rewards, trainer) to `RunConfig` the same way.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from spell_core.models.assets import DEFAULT_CORPUS, DEFAULT_MODEL

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
    name: str = DEFAULT_MODEL  # alias (see spell_core.models.assets) or local HF checkpoint folder
    device: str = "auto"  # auto: cuda when available, else cpu


@dataclass
class DataOptions:
    corpus: str | list[str] = DEFAULT_CORPUS  # alias (spell_core.models.assets), folder, or table file(s) (corpus_tables)
    text_field: str = "text"  # table corpora: the document column
    cluster_field: str = "cluster"  # table corpora: the column marking related documents
    # SPEC: 16K tokens of documents per cluster; the instructions and the response come on top
    ctx: int = 16 * 1024
    # room for the role prompt around the documents (instructions, document tags, history
    # memory, the question): the model's context must hold ctx + prompt_tokens + response
    prompt_tokens: int = 1024
    # --tasks options: "TYPES" (whole corpus) or "PREFIX=TYPES"; see spell_core/data/task_types.py
    tasks: list[str] = field(default_factory=list)


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
    questions: int = 480  # questioner prompts per generation round (the released scripts)
    kept_groups: int = 128  # N: responder groups with non-zero reward variance to collect
    max_rounds: int = 10  # cap on generation rounds per step when N is not reached
    verifier_group_size: int | None = None  # judgments per responder answer; None: G
    negatives_ratio: float = 1.0  # questioner negatives per positive, per task type
    verifier_share: float = 1.0  # verifier trajectories ≈ this × questioner positives
    agreement_low: float = 0.51  # verifier groups kept when the share of judgments agreeing
    agreement_high: float = 0.99  # with the majority lies in [low, high]
    memory_capacity: int = 3  # L: questions remembered per (cluster, task type)
    memory_admission: str = "released"  # r̄ in [0.01, 1] (released code); "paper": 0 < r̄ < 1
    # passed to chat templates that take it (Qwen3's enable_thinking); None: the template's default
    enable_thinking: bool | None = None
    new_documents: int = 5  # m: fresh documents shown to the questioner
    # new tokens per role; None: SamplingOptions.max_response_tokens
    questioner_tokens: int | None = None
    grounding_tokens: int | None = None
    responder_tokens: int | None = None
    verifier_tokens: int | None = None
    # sample the grounding answers and the responders' G answers in one call (one decode loop
    # instead of two; responders of questions the filter then rejects are wasted): what a CPU run
    # wants, where a decode step costs about the same for 8 rows or 40 (it reads all the weights)
    overlap_grounding: bool = False
    questioner_reward: str = "gaussian"  # or the ablations "linear" (1 - r), "triangle" (1 - 2|r - 0.5|)
    shuffle_options: bool = False  # doc_mc: permute a generated question's options before the responders see it
    advantage_eps: float = 1e-6
    kv_budget_tokens: int | None = None  # sampler KV cache size in tokens; None: everything at once
    cuda_graph: bool | None = None  # replay each decode step as a CUDA graph; None: on CUDA when supported


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
        """Tokens of documents a cluster may hold: `--ctx` itself (SPEC: ctx is the document budget)."""
        return self.data.ctx

    @property
    def context_needed(self) -> int:
        """Tokens the model's context must hold: documents + prompt room + the longest response."""
        return context_needed(self.data.ctx, self.data.prompt_tokens, self.sampling.max_response_tokens)

    def to_dict(self) -> dict:
        return {**asdict(self), "cluster_budget": self.cluster_budget, "context_needed": self.context_needed}


def context_needed(ctx: int, prompt_tokens: int, max_response_tokens: int) -> int:
    """ctx (documents) + prompt_tokens + max_response_tokens: the responder's whole input and
    output; RoPE scaling extends a model whose native context is shorter."""
    return ctx + prompt_tokens + max_response_tokens
