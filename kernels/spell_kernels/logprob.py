"""Fused linear log-prob: per-token log-probabilities (and entropies) of target ids under
softmax(z), z = softcap(logit_scale * hidden @ weight.T) / temperature, without ever
materialising the (N, V) logits (softcap(y) = c tanh(y / c), as Gemma's final logits; off by default).

  fused_linear_logprob(hidden (N,H), weight (V,H), targets (N,), temperature=1.0,
                       return_entropy=False, ignore_index=-100, *, softcap=None,
                       logit_scale=1.0, check=None) -> logprobs (N,) fp32 [, entropy (N,) fp32]

Tokens run in chunks of rows: one chunk's logits (rows x V) come from a matmul, are reduced
to per-token statistics (log-sum-exp, target log-prob, entropy) and are dropped. The
backward recomputes a chunk's logits and turns them, in place, into the logit gradient.
With z = logits / T, p = softmax(z), logp_j = z_j - lse and H = lse - sum_j p_j z_j:

  d logp_t / dz_j = 1[j = t] - p_j        dH / dz_j = -p_j (z_j - sum_k p_k z_k) = -p_j (logp_j + H)

so dz = g_logp * (onehot_t - p) - g_H * p * (logp + H). With y = logit_scale * h w^T:
d y = dz / T without soft-cap, dz (1 - tanh^2(y / c)) / T with it.

The row reductions over the vocabulary run in Triton kernels on CUDA (a loop over vocab
blocks with an online log-sum-exp) and in PyTorch on CPU; the matmuls are cuBLAS / MKL
either way. `linear_logprob_chunks` also serves losses that know their gradient with
respect to the log-probs at forward time (policy_loss): it then forms the input and weight
gradients in the same pass, so the logits are computed once instead of twice.
"""
import math

import torch

from ._dispatch import use_triton
from ._triton import tl, triton

# Bytes of logits one chunk may hold. CPU: 128 MB measured faster than 32 MB on 2 busy cores
# (fewer, larger parallel regions) and keeps the whole op near 4 % of the naive path's peak
# at 16k tokens; CUDA: large chunks keep cuBLAS efficient.
_CPU_CHUNK_BYTES = 128 << 20
_CUDA_CHUNK_BYTES = 1 << 30
_BLOCK_V = 4096  # vocab entries per Triton loop step (GPU); the last block is masked
_NUM_WARPS = 16


@triton.jit
def _logprob_stats_kernel(logits_ptr, targets_ptr, lse_ptr, logp_ptr, entropy_ptr,
                          n_vocab, stride_row, ignore_index,
                          BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """One program per row: log-sum-exp, target log-prob and (optionally) entropy."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    # running max m, sum_exp s = sum e^(z-m), and shifted moment t = sum e^(z-m) (z-m): the
    # entropy log(s) - t/s then never subtracts two large numbers
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        mask = start + offs < n_vocab
        z = tl.load(row_ptr + start + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:
            shift = (tl.where(s > 0, m, m_new) - m_new) * s  # m = -inf while s = 0
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    z_t = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(logp_ptr + row, tl.where(valid, (z_t - m) - log_s, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - t / s, 0.0))


@triton.jit
def _logprob_grad_kernel(logits_ptr, targets_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr,
                         n_vocab, stride_row, ignore_index,
                         BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """One program per row: overwrite the row's logits with dz (see the module docstring)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    lse = tl.load(lse_ptr + row)
    g_logp = tl.where(valid, tl.load(g_logp_ptr + row), 0.0)
    if WITH_ENTROPY:
        g_ent = tl.where(valid, tl.load(g_entropy_ptr + row), 0.0)
        ent = tl.load(entropy_ptr + row)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        mask = cols < n_vocab
        logp = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) - lse
        coef = g_logp
        if WITH_ENTROPY:
            coef = g_logp + g_ent * (logp + ent)
        dz = tl.where(cols == target, g_logp, 0.0) - tl.exp(logp) * coef
        tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=mask)


# --- row reductions on one chunk of logits: Triton launch or PyTorch ----------------------

def _row_stats_(z, targets, ignore_index, with_entropy, triton_rows, scratch):
    """Per-row statistics of the logits z (rows, V): (lse, logp, entropy or None, z_lse).
    scratch() gives a buffer shaped like z (PyTorch path).
    The PyTorch path shifts z in place by its row max; z_lse is the value to subtract from
    z's current contents to get log p (lse itself for the Triton path, which leaves z alone).
    logp and entropy are 0 where the target is ignore_index."""
    rows, n_vocab = z.shape
    if triton_rows:
        lse, logp, entropy = (torch.empty(rows, dtype=torch.float32, device=z.device) for _ in range(3))
        _logprob_stats_kernel[(rows,)](z, targets, lse, logp, entropy, n_vocab, z.stride(0), ignore_index,
                                       BLOCK_V=_block_v(n_vocab), WITH_ENTROPY=with_entropy,
                                       num_warps=_NUM_WARPS)
        return lse, logp, (entropy if with_entropy else None), lse
    valid = targets != ignore_index
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)  # z - m <= 0 from here on
    exp = torch.exp(z, out=scratch())
    s = exp.sum(dim=1)
    log_s = torch.log(s)
    z_t = z.gather(1, torch.where(valid, targets, 0).long()[:, None]).squeeze(1)
    logp = torch.where(valid, z_t - log_s, 0.0)
    entropy = None
    if with_entropy:
        # moment = sum e^(z-m) (z-m): the entropy log(s) - moment/s never subtracts large numbers.
        # In place and through sum (pairwise): a bmm dot product loses digits over 150k entries.
        moment = exp.mul_(z).sum(dim=1)
        entropy = torch.where(valid, log_s - moment / s, 0.0)
    return m.squeeze(1) + log_s, logp, entropy, log_s


def _row_grad_(z, targets, z_lse, entropy, g_logp, g_entropy, ignore_index, triton_rows, scratch):
    """Overwrite the logits z with dz, where z - z_lse = log p. g_entropy=None: no entropy term."""
    rows, n_vocab = z.shape
    with_entropy = g_entropy is not None
    if triton_rows:
        f32 = [t.float().contiguous() for t in (z_lse, g_logp)]
        ent = [t.float().contiguous() for t in (entropy, g_entropy)] if with_entropy else f32
        _logprob_grad_kernel[(rows,)](z, targets, f32[0], ent[0], f32[1], ent[1], n_vocab, z.stride(0),
                                      ignore_index, BLOCK_V=_block_v(n_vocab), WITH_ENTROPY=with_entropy,
                                      num_warps=_NUM_WARPS)
        return z
    valid = targets != ignore_index
    g_logp = torch.where(valid, g_logp.to(z.dtype), 0.0)
    z.sub_(z_lse.to(z.dtype)[:, None])  # log p
    if with_entropy:
        g_entropy = torch.where(valid, g_entropy.to(z.dtype), 0.0)
        p = torch.exp(z, out=scratch())
        # dz = -(g_logp + g_H (logp + H)) p, plus g_logp at the target
        z.add_(entropy.to(z.dtype)[:, None]).mul_(-g_entropy[:, None]).sub_(g_logp[:, None]).mul_(p)
    else:
        z.exp_().mul_(-g_logp[:, None])
    rows_idx = torch.arange(rows, device=z.device)
    z.index_put_((rows_idx, torch.where(valid, targets, 0).long()), g_logp, accumulate=True)
    return z


def _block_v(n_vocab):
    return min(_BLOCK_V, triton.next_power_of_2(n_vocab))


# --- the chunk loop ---------------------------------------------------------------------

class _Chunks:
    """Token chunks of z = softcap(scale * hidden @ weight.T) / T in one reused logits buffer
    (and, allocated on first use, a scratch buffer of the same size for the PyTorch row passes;
    with a soft-cap and gradients, one more for dz/dy)."""

    def __init__(self, hidden, weight, temperature, logit_scale=1.0, softcap=None, with_grad=False):
        on_cuda = hidden.device.type == "cuda"
        self.triton_rows = use_triton(hidden, weight)
        if torch.float64 in (hidden.dtype, weight.dtype):
            cdt = torch.float64
        else:
            cdt = weight.dtype if on_cuda else torch.float32  # CPU half-precision matmuls are slow
        self.dtype = cdt
        self.stat_dtype = torch.float64 if cdt == torch.float64 else torch.float32
        self.hidden, self.weight = hidden, weight.to(cdt)
        # z = post * f(pre * h w^T): without a soft-cap f is the identity and everything is folded
        # into the hidden rows (pre = scale / T); with one, 1/T applies after the tanh
        self.softcap = softcap
        self.pre = logit_scale / temperature if softcap is None else logit_scale
        self.post = 1.0 if softcap is None else 1.0 / temperature
        n, n_vocab = hidden.shape[0], weight.shape[0]
        budget = _CUDA_CHUNK_BYTES if on_cuda else _CPU_CHUNK_BYTES
        self.rows = max(1, min(n, budget // (n_vocab * self.weight.element_size())))
        self.logits = torch.empty(self.rows, n_vocab, dtype=cdt, device=hidden.device)
        self._scratch = None
        self.cap_grad = None  # d z / d y per logit of the current chunk (soft-cap with gradients)
        if softcap is not None and with_grad:
            self.cap_grad = torch.empty_like(self.logits)

    def scratch(self, rows):
        """Zero-argument getter of a (rows, V) scratch view, for the PyTorch row passes."""
        def get():
            if self._scratch is None:
                self._scratch = torch.empty_like(self.logits)
            return self._scratch[:rows]
        return get

    def __iter__(self):
        """Yield (start, end, h, z): the chunk's hidden rows scaled by `pre`, and their logits."""
        n = self.hidden.shape[0]
        for start in range(0, n, self.rows):
            end = min(start + self.rows, n)
            h = self.hidden[start:end].to(self.dtype)
            if self.pre != 1.0:
                h = h * self.pre
            z = torch.mm(h, self.weight.T, out=self.logits[: end - start])
            if self.softcap is not None:
                z.div_(self.softcap).tanh_()
                if self.cap_grad is not None:  # post * (1 - tanh^2)
                    d = torch.mul(z, z, out=self.cap_grad[: end - start])
                    d.sub_(1.0).mul_(-self.post)
                z.mul_(self.softcap * self.post)
            yield start, end, h, z

    def grad_buffers(self, need_hidden_grad, need_weight_grad):
        d_hidden = d_weight = None
        if need_hidden_grad:
            d_hidden = torch.empty(self.hidden.shape, dtype=self.dtype, device=self.hidden.device)
        if need_weight_grad:  # accumulated over chunks: fp32 whatever the weight dtype
            d_weight = torch.zeros(self.weight.shape, dtype=self.stat_dtype, device=self.weight.device)
        return d_hidden, d_weight

    def backprop(self, start, end, h, z, targets, z_lse, entropy, g_logp, g_entropy, ignore_index,
                 d_hidden, d_weight):
        """Turn the chunk's logits into dz in place and add its share to the gradients."""
        dz = _row_grad_(z, targets, z_lse, entropy, g_logp, g_entropy, ignore_index, self.triton_rows,
                        self.scratch(end - start))
        if self.cap_grad is not None:
            dz.mul_(self.cap_grad[: end - start])  # now d y
        # y = (pre h) w^T, h already scaled: d w = dy^T (pre h), d h = (dy w) pre
        if d_hidden is not None:
            torch.mm(dz, self.weight, out=d_hidden[start:end])
            if self.pre != 1.0:
                d_hidden[start:end].mul_(self.pre)
        if d_weight is not None:
            _addmm_fp32_(d_weight, dz.T, h)


def _addmm_fp32_(acc, a, b):
    """acc += a @ b with acc in fp32 (or fp64) and a, b possibly half precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    try:  # cuBLAS: half-precision inputs, fp32 output, no rounding of the product
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        acc.add_(torch.mm(a, b))


def linear_logprob_chunks(hidden, weight, targets, temperature=1.0, ignore_index=-100,
                          with_entropy=False, grad_fn=None, need_hidden_grad=True, need_weight_grad=True,
                          logit_scale=1.0, softcap=None):
    """The chunked pass behind fused_linear_logprob and policy_loss.

    hidden (N, H), weight (V, H), targets (N,). Returns (lse, logp, entropy, d_hidden,
    d_weight): lse/logp/entropy (N,) fp32 (fp64 for fp64 inputs), entropy None unless
    with_entropy, and the gradients None unless grad_fn is given. grad_fn(start, end,
    logp_chunk, entropy_chunk) -> (g_logp, g_entropy or None) gives, per chunk, the
    gradient of the caller's loss with respect to that chunk's outputs; the input and weight
    gradients are then formed from the logits already in memory (one matmul saved).
    """
    chunks = _Chunks(hidden, weight, temperature, logit_scale, softcap, with_grad=grad_fn is not None)
    n = hidden.shape[0]
    lse, logp = (torch.empty(n, dtype=chunks.stat_dtype, device=hidden.device) for _ in range(2))
    entropy = torch.empty_like(lse) if with_entropy else None
    d_hidden = d_weight = None
    if grad_fn is not None:
        d_hidden, d_weight = chunks.grad_buffers(need_hidden_grad, need_weight_grad)
    for start, end, h, z in chunks:
        tgt = targets[start:end]
        lse_c, logp_c, ent_c, z_lse = _row_stats_(z, tgt, ignore_index, with_entropy, chunks.triton_rows,
                                                  chunks.scratch(end - start))
        logp_c.clamp_(max=0.0)  # exact math never exceeds 0; this guards the last rounding bit
        lse[start:end], logp[start:end] = lse_c, logp_c
        if with_entropy:
            entropy[start:end] = ent_c
        if grad_fn is not None:
            g_logp, g_ent = grad_fn(start, end, logp_c, ent_c)
            chunks.backprop(start, end, h, z, tgt, z_lse, ent_c, g_logp, g_ent, ignore_index, d_hidden, d_weight)
    return lse, logp, entropy, _cast(d_hidden, hidden.dtype), _cast(d_weight, weight.dtype)


def linear_logprob_backward(hidden, weight, targets, lse, entropy, g_logp, g_entropy, temperature,
                            ignore_index, need_hidden_grad, need_weight_grad, logit_scale=1.0, softcap=None):
    """Recompute each chunk's logits and back-propagate g_logp (and g_entropy) through them."""
    chunks = _Chunks(hidden, weight, temperature, logit_scale, softcap, with_grad=True)
    d_hidden, d_weight = chunks.grad_buffers(need_hidden_grad, need_weight_grad)
    for start, end, h, z in chunks:
        ent = g_ent = None
        if g_entropy is not None:
            ent, g_ent = entropy[start:end], g_entropy[start:end]
        chunks.backprop(start, end, h, z, targets[start:end], lse[start:end], ent, g_logp[start:end], g_ent,
                        ignore_index, d_hidden, d_weight)
    return _cast(d_hidden, hidden.dtype), _cast(d_weight, weight.dtype)


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def should_check(check, *tensors):
    """Validate tensor contents (a host sync on GPU) when asked, or by default on CPU where it is free
    (but not while torch.compile traces: a data-dependent branch would break the graph)."""
    if check is None:
        return all(t.device.type == "cpu" for t in tensors) and not torch.compiler.is_compiling()
    return bool(check)


def validate_logprob_inputs(hidden, weight, targets, temperature, ignore_index, check=None, softcap=None,
                            logit_scale=1.0):
    """Shapes and arguments always (no sync); target ids in range only when should_check(check)."""
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden (..., H) and weight (V, H) must share H: got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None for no soft-cap), got {softcap}")
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    if should_check(check, targets):
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"target ids must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}; "
                             f"found {targets[bad][0].item()}")


# --- the op: torch.library custom ops with fake implementations, so torch.compile traces
# through a call without a graph break (the chunk loop runs as one opaque op) -------------

@torch.library.custom_op("spell_kernels::linear_logprob", mutates_args=())
def _linear_logprob_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                       with_entropy: bool, ignore_index: int, logit_scale: float,
                       softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy ((N,) or (0,) without with_entropy), lse), stat dtype."""
    lse, logp, entropy, _, _ = linear_logprob_chunks(hidden, weight, targets, temperature, ignore_index,
                                                     with_entropy, logit_scale=logit_scale, softcap=softcap)
    if entropy is None:
        entropy = logp.new_empty(0)
    else:
        entropy = entropy.clamp_(0.0, math.log(weight.shape[0]))
    return logp, entropy, lse


def stat_dtype(hidden, weight):
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


@_linear_logprob_op.register_fake
def _(hidden, weight, targets, temperature, with_entropy, ignore_index, logit_scale, softcap):
    n, dt = hidden.shape[0], stat_dtype(hidden, weight)
    return hidden.new_empty(n, dtype=dt), hidden.new_empty(n if with_entropy else 0, dtype=dt), \
        hidden.new_empty(n, dtype=dt)


@torch.library.custom_op("spell_kernels::linear_logprob_backward", mutates_args=())
def _linear_logprob_backward_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor,
                                g_entropy: torch.Tensor | None, temperature: float, ignore_index: int,
                                logit_scale: float, softcap: float | None, need_hidden_grad: bool,
                                need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_hidden, d_weight); a gradient that is not needed comes back as an empty (0,) tensor."""
    d_hidden, d_weight = linear_logprob_backward(
        hidden, weight, targets, lse, entropy if g_entropy is not None else None, g_logp, g_entropy,
        temperature, ignore_index, need_hidden_grad, need_weight_grad, logit_scale, softcap)
    return (hidden.new_empty(0) if d_hidden is None else d_hidden,
            weight.new_empty(0) if d_weight is None else d_weight)


@_linear_logprob_backward_op.register_fake
def _(hidden, weight, targets, lse, entropy, g_logp, g_entropy, temperature, ignore_index, logit_scale, softcap,
      need_hidden_grad, need_weight_grad):
    return (torch.empty_like(hidden) if need_hidden_grad else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, temperature, with_entropy, ignore_index, logit_scale, softcap = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, lse, entropy)
    ctx.args = (temperature, with_entropy, ignore_index, logit_scale, softcap)


def _backward(ctx, g_logp, g_entropy, _g_lse):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    temperature, with_entropy, ignore_index, logit_scale, softcap = ctx.args
    d_hidden, d_weight = _linear_logprob_backward_op(
        hidden, weight, targets, lse, entropy, g_logp, g_entropy if with_entropy else None, temperature,
        ignore_index, logit_scale, softcap, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (d_hidden if ctx.needs_input_grad[0] else None, d_weight if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None)


_linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_logprob(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100, *,
                         softcap=None, logit_scale=1.0, check=None):
    """Log-probability of each target id under softmax(softcap(logit_scale * hidden @ weight.T) / temperature).

    hidden (..., H) and weight (V, H) of one floating dtype (or hidden in another; it is
    cast), targets (...) integer ids. Returns logprobs (...) in fp32 (fp64 for fp64
    inputs), and with return_entropy=True also the entropy (...) of the whole distribution,
    in [0, log V]. Positions whose target equals ignore_index give 0 and no gradient.
    softcap=c applies c * tanh(y / c) to the scaled logits y (Gemma 2's final_logit_softcapping);
    logit_scale multiplies them first (Cohere's logit_scale); temperature divides last, as a
    sampler would. Differentiable with respect to hidden and weight through both outputs; the
    weight gradient accumulates in fp32. Memory: one chunk of logits (up to 128 MB on CPU, plus
    a scratch chunk; up to 1 GiB on CUDA) instead of (N, V).
    check: validate target ids (a host sync on GPU); None = only on CPU tensors.
    Registered as the custom op torch.ops.spell_kernels.linear_logprob (torch.compile traces it).
    """
    validate_logprob_inputs(hidden, weight, targets, temperature, ignore_index, check, softcap, logit_scale)
    lead = hidden.shape[:-1]
    logp, entropy, _ = _linear_logprob_op(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                          float(temperature), bool(return_entropy), int(ignore_index),
                                          float(logit_scale), None if softcap is None else float(softcap))
    if not return_entropy:
        return logp.view(lead)
    return logp.view(lead), entropy.view(lead)
