"""Token selection: temperature, top-k, top-p, greedy, and reproducible per-sample draws.

Order of the filters (transformers' and vLLM's): logits / temperature -> top-k -> top-p on
the distribution renormalised over the top-k survivors. Ties at the top-k boundary are all
kept (as transformers does); top-p keeps the smallest set of most likely tokens whose mass
reaches top_p (among equally likely tokens at that boundary, whichever topk lists first).

Log-probs are those of the unmodified distribution at the sampling temperature,
log_softmax(logits / T)[token] in fp32, before any truncation: exactly what the trainer's
`CausalLM.token_logprobs(..., temperature=T)` scores, computed the same way (hidden / T
through the LM head, then row max / sum of exp / log). Greedy (T = 0) takes the argmax and
reports log-probs at T = 1.

Draws: inverse CDF over the kept tokens in vocabulary order, one uniform number per sample
and step from that sample's own CPU `torch.Generator`. A sample's tokens then depend only on
its seed and its own logits, never on which other samples share the decode batch.
"""
import hashlib

import torch

__all__ = ["check_sampling_params", "sample_seed", "random_seeds", "make_generators", "draw_uniforms",
           "truncation_mask", "temperature_scale", "token_logprobs", "select_tokens"]


def check_sampling_params(temperature: float, top_p: float, top_k: int) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = off); got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off); got {top_k!r}")


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample `sample_index` of prompt `prompt_index` in a request seeded `seed`:
    the first 8 bytes (little endian, top bit cleared) of sha256("spell-sampler:{seed}:{i}:{j}").
    Passing these per-sample seeds explicitly reproduces the samples one at a time."""
    digest = hashlib.sha256(f"spell-sampler:{int(seed)}:{int(prompt_index)}:{int(sample_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_seeds(count: int) -> list[int]:
    """Fresh per-sample seeds from torch's global generator (reproducible under torch.manual_seed)."""
    return torch.randint(0, 1 << 62, (count,), dtype=torch.int64).tolist()


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) float64 in [0, 1): one draw from each sample's generator."""
    if not generators:
        return torch.empty(0, dtype=torch.float64)
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def truncation_mask(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor | None:
    """(B, V) bool of the tokens top-k then top-p keep from logits already divided by the
    temperature; None when neither filter is on."""
    keep = None
    logits = scaled_logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        keep = logits >= kth
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        keep_p = _top_p_mask(torch.softmax(logits, dim=-1), top_p)
        keep = keep_p if keep is None else keep & keep_p
    return keep


def _top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps token i of a row when the mass of the tokens sorted before it is < top_p.

    Sorting a whole 50k-150k vocabulary per step costs more than the rest of sampling, and
    the kept set is usually a few dozen tokens: a row's most likely `k` tokens (topk) decide
    it as soon as their mass reaches top_p; for the rows where it does not, k grows 8x."""
    vocab = probs.shape[-1]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    rows = torch.arange(probs.shape[0], device=probs.device)
    k = min(vocab, 256)
    while rows.numel():
        top_probs, top_ids = torch.topk(probs[rows], k, dim=-1)  # sorted, descending
        top_probs = top_probs.double()
        cum = torch.cumsum(top_probs, dim=-1)
        decided = (cum[:, -1] >= top_p) | (k == vocab)
        keep_top = (cum - top_probs) < top_p  # the first token always stays
        keep[rows[decided]] = keep[rows[decided]].scatter_(-1, top_ids[decided], keep_top[decided])
        rows = rows[~decided]
        k = min(vocab, 8 * k)
    return keep


def temperature_scale(temperature: float) -> float:
    """The factor hidden states are multiplied by before the LM head: 1/T (1 when greedy)."""
    return 1.0 / temperature if temperature > 0 else 1.0


def token_logprobs(scaled_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 log-softmax of scaled logits (B, V) at tokens (B,), with the arithmetic of the
    trainer's fused linear log-prob (row max, sum of exp, log; capped at 0), so that the two
    agree to the last bits whenever their logits do."""
    z = scaled_logits.float()
    m = z.amax(dim=-1, keepdim=True)
    log_sum = torch.log(torch.exp(z - m).sum(dim=-1))
    z_t = z.gather(-1, tokens[:, None]).squeeze(-1) - m.squeeze(-1)
    return (z_t - log_sum).clamp_(max=0.0)


def select_tokens(scaled_logits: torch.Tensor, top_k: int, top_p: float,
                  uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) int64 and their log-probs (B,) fp32 from logits already at the
    sampling temperature, (B, V) = (hidden / T) @ W^T (see `temperature_scale`).

    uniforms (B,) in [0, 1) drive the draws; None means greedy (argmax; top-k / top-p unused)."""
    z = scaled_logits.float()
    if uniforms is None:
        tokens = z.argmax(dim=-1)
        return tokens, token_logprobs(z, tokens)
    keep = truncation_mask(z, top_k, top_p)
    probs = torch.softmax(z if keep is None else z.masked_fill(~keep, float("-inf")), dim=-1)
    cdf = torch.cumsum(probs.double(), dim=-1)
    targets = uniforms.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    # the first token whose cumulative mass passes the target: never a token of probability 0
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=z.shape[-1] - 1)
    return tokens, token_logprobs(z, tokens)
