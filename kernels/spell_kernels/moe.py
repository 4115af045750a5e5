"""Mixture-of-experts FFN: route each token to its top-k experts, SwiGLU, weighted combine.

    out = moe_experts(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)

hidden (T, H); gate_up_proj (E, 2I, H) (gate rows first, then up: transformers 5's fused
layout); down_proj (E, H, I); topk_ids (T, k) integer expert ids; topk_weights (T, k).
out[t] = sum_j topk_weights[t, j] * down_proj[e] @ (silu(gate_e @ h_t) * (up_e @ h_t)), e = topk_ids[t, j].
Differentiable in hidden, both weights and topk_weights. topk_ids may be any ids in [0, E)
(replayed routing need not be the router's top-k; repeated ids in a row are allowed).

Triton path (CUDA tensors; SPELL_KERNELS=triton + TRITON_INTERPRET=1 in tests), with the
(token, slot) pairs sorted by expert (moe_routing.py) into P = T * k rows:
  forward   gate/up grouped GEMM, token rows gathered as they load, SwiGLU in the epilogue -> act (P, I)
            down grouped GEMM -> y (P, H) unweighted
            combine: out[t] = sum_j w[t, j] y[row of (t, j)], slots in order (no atomics)
  backward  d w[t, j] = <g[t], y[row]>
            d act = (w g[token]) @ down_e, gathered, SwiGLU backward in the epilogue -> d gate/up (P, 2I)
            d down_e = sum over e's rows (w g[token])^T act,  d gate_up_e = sum d gate/up^T h[token]
            d hidden: d gate/up @ gate_up_e per row (P, H), then combined like the forward (weights 1)
Grids come from shapes only (moe_routing.MoeRouting.max_tiles): no host sync, CUDA-graph safe.
Row offsets are 64-bit. Matmuls accumulate in fp32; float64 inputs take the PyTorch path.
PyTorch path (CPU tensors, and float64): a loop over experts on rows sorted by expert
(moe_experts_torch); reference.moe_experts is the plain loop (the benchmark's baseline).
"""
import torch

from ._dispatch import use_triton
from ._triton import tl, triton
from .moe_routing import MoeRouting, expert_tile, moe_routing

__all__ = ["moe_experts"]

# Tiles on a GPU. BLOCK_M (rows of one expert per tile) is shared by every tile-mapped kernel:
# it sizes the routing's tile map. "weight_grad": BLOCK_M x BLOCK_N of a weight gradient, BLOCK_K
# rows per step. Checked for sm_90 without spills by tests/kernels/test_moe_aot.py.
GPU_BLOCK_M = 64
GPU_CONFIGS = {
    "gate_up": dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "matmul": dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "weight_grad": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "combine": dict(BLOCK=1024, num_warps=4),
}
# Triton 3.6 (the GPU image's version): replacements where it spills at the configs above
GPU_CONFIGS_BEFORE_TRITON_3_7: dict = {}
# float32 on a GPU is for checking: 3xTF32 dots hold many registers, so small tiles
GPU_CONFIGS_FP32 = {
    "gate_up": dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    "matmul": dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    "weight_grad": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    "combine": dict(BLOCK=1024, num_warps=4),
}
# TRITON_INTERPRET=1 on CPU tensors (tests): small tiles, few programs
INTERPRET_BLOCK_M = 16
INTERPRET_CONFIGS = {
    "gate_up": dict(BLOCK_N=32, BLOCK_K=32),
    "matmul": dict(BLOCK_N=32, BLOCK_K=32),
    "weight_grad": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16),
    "combine": dict(BLOCK=64),
}


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gate_up_swiglu_kernel(X, W, Act, Pre, sorted_pairs, tile_start, tile_end, expert_start, expert_end,
                           n_experts, n_inter, n_hidden, top_k,
                           stride_xt, stride_we, stride_wn, stride_ar, stride_pr,
                           E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SAVE_PRE: tl.constexpr, PRECISION: tl.constexpr):
    """act[r, n] = silu(x[token(r)] . W[e, n]) * (x[token(r)] . W[e, I + n]) for the rows of one tile."""
    expert, row0, row_end = expert_tile(tl.program_id(0), tile_start, tile_end, expert_start, expert_end,
                                        n_experts, E_PAD, BLOCK_M)
    if expert >= n_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    token = tl.load(sorted_pairs + rows, mask=row_mask, other=0) // top_k
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + token.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    w_base = W + expert.to(tl.int64) * stride_we
    wg_ptrs = w_base + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + n_inter * stride_wn  # I x H < 2^31
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, n_hidden, BLOCK_K):
        k_mask = offs_k + k0 < n_hidden
        x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.dot(x, tl.load(wg_ptrs + k0, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
        up = tl.dot(x, tl.load(wu_ptrs + k0, mask=w_mask, other=0.0), up, input_precision=PRECISION)
    out_mask = row_mask[:, None] & n_mask[None, :]
    act = gate * tl.sigmoid(gate) * up
    tl.store(Act + rows.to(tl.int64)[:, None] * stride_ar + offs_n[None, :], act.to(Act.dtype.element_ty),
             mask=out_mask)
    if SAVE_PRE:
        pre_ptrs = Pre + rows.to(tl.int64)[:, None] * stride_pr + offs_n[None, :]
        tl.store(pre_ptrs, gate.to(Pre.dtype.element_ty), mask=out_mask)
        tl.store(pre_ptrs + n_inter, up.to(Pre.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_matmul_kernel(A, B, C, Scale, Pre, sorted_pairs, tile_start, tile_end, expert_start, expert_end,
                           n_experts, n_cols, n_inner, top_k,
                           stride_ar, stride_be, stride_bn, stride_bk, stride_cr, stride_pr,
                           E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GATHER_A: tl.constexpr, SCALE_A: tl.constexpr,
                           SWIGLU_BWD: tl.constexpr, PRECISION: tl.constexpr):
    """c[r, n] = s(r) * sum_k a[row(r), k] * B[e, n, k] (B's n and k strides given) for one tile's rows;
    row(r) = token of sorted pair r (GATHER_A) or r; s(r) = Scale[pair] (SCALE_A) or 1.
    SWIGLU_BWD: c is d act; store d gate, d up (2 * n_cols wide) from the saved gate, up in Pre."""
    expert, row0, row_end = expert_tile(tl.program_id(0), tile_start, tile_end, expert_start, expert_end,
                                        n_experts, E_PAD, BLOCK_M)
    if expert >= n_experts:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    a_rows = rows
    if GATHER_A or SCALE_A:
        pair = tl.load(sorted_pairs + rows, mask=row_mask, other=0)
        if GATHER_A:
            a_rows = pair // top_k
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_rows.to(tl.int64)[:, None] * stride_ar + offs_k[None, :]
    b_ptrs = (B + expert.to(tl.int64) * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn
              + offs_k.to(tl.int64)[:, None] * stride_bk)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, n_inner, BLOCK_K):
        k_mask = offs_k + k0 < n_inner
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0 * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if SCALE_A:
        acc = acc * tl.load(Scale + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_mask = row_mask[:, None] & n_mask[None, :]
    c_ptrs = C + rows.to(tl.int64)[:, None] * stride_cr + offs_n[None, :]
    if SWIGLU_BWD:
        pre_ptrs = Pre + rows.to(tl.int64)[:, None] * stride_pr + offs_n[None, :]
        gate = tl.load(pre_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        up = tl.load(pre_ptrs + n_cols, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = acc * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(c_ptrs, d_gate.to(C.dtype.element_ty), mask=out_mask)
        tl.store(c_ptrs + n_cols, (acc * gate * sig).to(C.dtype.element_ty), mask=out_mask)
    else:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=out_mask)


@triton.jit
def _expert_weight_grad_kernel(A, B, Scale, dW, sorted_pairs, expert_start, expert_end,
                               n_rows_w, n_cols_w, top_k, stride_ar, stride_br, stride_we, stride_wm,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr,
                               PRECISION: tl.constexpr):
    """dW[e, m, n] = sum over expert e's sorted rows r of s(r) a[row_a(r), m] b[row_b(r), n]
    (row = token of the pair when gathered, else r). An expert without rows gets exact zeros."""
    expert = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < n_rows_w
    n_mask = offs_n < n_cols_w
    first = tl.load(expert_start + expert)
    end = tl.load(expert_end + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(first, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < end
        pair = tl.load(sorted_pairs + rows, mask=r_mask, other=0)
        a_rows = rows
        b_rows = rows
        if GATHER_A:
            a_rows = pair // top_k
        if GATHER_B:
            b_rows = pair // top_k
        a = tl.load(A + a_rows.to(tl.int64)[:, None] * stride_ar + offs_m[None, :],
                    mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        if SCALE_A:
            scale = tl.load(Scale + pair, mask=r_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[:, None]).to(A.dtype.element_ty)
        b = tl.load(B + b_rows.to(tl.int64)[:, None] * stride_br + offs_n[None, :],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    w_ptrs = dW + expert.to(tl.int64) * stride_we + offs_m.to(tl.int64)[:, None] * stride_wm + offs_n[None, :]
    tl.store(w_ptrs, acc.to(dW.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(Y, Weights, inverse, Out, n_cols, top_k, stride_yr, stride_ot,
                    BLOCK: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """out[t] = sum_j w[t, j] y[inverse[t k + j]], summed in slot order (deterministic)."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, top_k):
        pair = token.to(tl.int64) * top_k + j
        row = tl.load(inverse + pair).to(tl.int64)
        y = tl.load(Y + row * stride_yr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y = y * tl.load(Weights + pair).to(tl.float32)
        acc += y
    tl.store(Out + token.to(tl.int64) * stride_ot + cols, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _routing_weight_grad_kernel(G, Y, inverse, dW, n_cols, top_k, stride_gt, stride_yr, BLOCK: tl.constexpr):
    """d w[p] = <g[token(p)], y[inverse[p]]> for pair p = program id."""
    pair = tl.program_id(0)
    token = (pair // top_k).to(tl.int64)
    row = tl.load(inverse + pair).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + token * stride_gt + cols, mask=mask, other=0.0).to(tl.float32)
        acc += g * tl.load(Y + row * stride_yr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dW + pair, tl.sum(acc, axis=0).to(dW.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers

def triton_version() -> tuple[int, int]:
    from .flash_attn import triton_version as version
    return version()


def block_m(device) -> int:
    return INTERPRET_BLOCK_M if device.type == "cpu" else GPU_BLOCK_M


def _config(kind, device, dtype):
    if device.type == "cpu":
        return dict(INTERPRET_CONFIGS[kind])
    return gpu_config(kind, dtype)


def gpu_config(kind, dtype):
    """The tiles of kernel `kind` on a GPU for this data type and the installed Triton."""
    if dtype == torch.float32:
        return dict(GPU_CONFIGS_FP32[kind])
    table = GPU_CONFIGS
    if triton_version() < (3, 7):
        table = {**table, **GPU_CONFIGS_BEFORE_TRITON_3_7}
    return dict(table[kind])


def _precision(dtype):
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _routing_args(routing: MoeRouting):
    return (routing.sorted_pairs, routing.tile_start, routing.tile_end, routing.expert_start, routing.expert_end)


def _e_pad(n_experts):
    return max(16, triton.next_power_of_2(n_experts))


def gate_up_swiglu(x, gate_up_proj, routing, save_pre):
    """(act (P, I), pre (P, 2I) gate then up, or None): the first grouped GEMM in sorted row order."""
    n_experts, two_i, n_hidden = gate_up_proj.shape
    n_inter = two_i // 2
    n_pairs = routing.sorted_pairs.numel()
    act = torch.empty(n_pairs, n_inter, dtype=x.dtype, device=x.device)
    pre = torch.empty(n_pairs, two_i, dtype=x.dtype, device=x.device) if save_pre else act
    cfg = _config("gate_up", x.device, x.dtype)
    grid = (routing.max_tiles, triton.cdiv(n_inter, cfg["BLOCK_N"]))
    _gate_up_swiglu_kernel[grid](x, gate_up_proj, act, pre, *_routing_args(routing), n_experts, n_inter, n_hidden,
                                 routing.top_k, x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1),
                                 act.stride(0), pre.stride(0), E_PAD=_e_pad(n_experts), BLOCK_M=routing.block_m,
                                 SAVE_PRE=save_pre, PRECISION=_precision(x.dtype), **cfg)
    return act, (pre if save_pre else None)


def grouped_matmul(a, weight, routing, n_cols, n_inner, stride_bn, stride_bk, *, gather=False, scale=None,
                   pre=None):
    """(P, n_cols) (2 n_cols with pre: the SwiGLU backward) in sorted row order: see _grouped_matmul_kernel."""
    n_pairs = routing.sorted_pairs.numel()
    out = torch.empty(n_pairs, n_cols * (2 if pre is not None else 1), dtype=a.dtype, device=a.device)
    cfg = _config("matmul", a.device, a.dtype)
    grid = (routing.max_tiles, triton.cdiv(n_cols, cfg["BLOCK_N"]))
    n_experts = weight.shape[0]
    _grouped_matmul_kernel[grid](a, weight, out, scale if scale is not None else a, pre if pre is not None else out,
                                 *_routing_args(routing), n_experts, n_cols, n_inner, routing.top_k, a.stride(0),
                                 weight.stride(0), stride_bn, stride_bk, out.stride(0),
                                 pre.stride(0) if pre is not None else 0, E_PAD=_e_pad(n_experts),
                                 BLOCK_M=routing.block_m, GATHER_A=gather, SCALE_A=scale is not None,
                                 SWIGLU_BWD=pre is not None, PRECISION=_precision(a.dtype), **cfg)
    return out


def expert_weight_grad(a, b, routing, n_experts, dtype, *, gather_a=False, gather_b=False, scale=None):
    """(E, a's width, b's width): dW[e] = sum over e's rows s(r) a[row]^T b[row] (see the kernel)."""
    n_rows_w, n_cols_w = a.shape[1], b.shape[1]
    d_weight = torch.empty(n_experts, n_rows_w, n_cols_w, dtype=dtype, device=a.device)
    cfg = _config("weight_grad", a.device, a.dtype)
    grid = (n_experts, triton.cdiv(n_rows_w, cfg["BLOCK_M"]), triton.cdiv(n_cols_w, cfg["BLOCK_N"]))
    _expert_weight_grad_kernel[grid](a, b, scale if scale is not None else a, d_weight, routing.sorted_pairs,
                                     routing.expert_start, routing.expert_end, n_rows_w, n_cols_w, routing.top_k,
                                     a.stride(0), b.stride(0), d_weight.stride(0), d_weight.stride(1),
                                     GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=scale is not None,
                                     PRECISION=_precision(a.dtype), **cfg)
    return d_weight


def combine(y, weights, routing, n_tokens, dtype):
    """(T, width of y): each token's k sorted rows summed in slot order, weighted when weights is given."""
    out = torch.empty(n_tokens, y.shape[1], dtype=dtype, device=y.device)
    cfg = _config("combine", y.device, y.dtype)
    block = min(cfg.pop("BLOCK"), max(16, triton.next_power_of_2(y.shape[1])))
    grid = (n_tokens, triton.cdiv(y.shape[1], block))
    _combine_kernel[grid](y, weights if weights is not None else y, routing.inverse, out, y.shape[1], routing.top_k,
                          y.stride(0), out.stride(0), BLOCK=block, HAS_WEIGHTS=weights is not None, **cfg)
    return out


def routing_weight_grad(g, y, routing, dtype):
    """(P,) d topk_weights, flat in pair order."""
    n_pairs = routing.inverse.numel()
    out = torch.empty(n_pairs, dtype=dtype, device=g.device)
    block = min(1024, max(16, triton.next_power_of_2(g.shape[1])))
    _routing_weight_grad_kernel[(n_pairs,)](g, y, routing.inverse, out, g.shape[1], routing.top_k, g.stride(0),
                                            y.stride(0), BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------- autograd

class _MoeExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, gate_up_proj, down_proj, topk_ids, topk_weights, save_pre):
        n_tokens, top_k = topk_ids.shape
        n_experts, two_i, _ = gate_up_proj.shape
        dtype = gate_up_proj.dtype
        x = hidden.to(dtype).contiguous()
        weights = topk_weights.reshape(-1).contiguous()
        routing = moe_routing(topk_ids, n_experts, block_m(hidden.device))
        act, pre = gate_up_swiglu(x, gate_up_proj, routing, save_pre)
        y = grouped_matmul(act, down_proj, routing, down_proj.shape[1], two_i // 2, down_proj.stride(1),
                           down_proj.stride(2))
        out = combine(y, weights, routing, n_tokens, hidden.dtype)
        ctx.routing = routing
        ctx.save_for_backward(x, gate_up_proj, down_proj, weights, act if save_pre else None, pre,
                              y if save_pre and ctx.needs_input_grad[4] else None)
        ctx.shape = (n_tokens, top_k, hidden.dtype, topk_weights.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up_proj, down_proj, weights, act, pre, y = ctx.saved_tensors
        routing = ctx.routing
        n_tokens, top_k, hidden_dtype, weights_dtype = ctx.shape
        n_experts, two_i, n_hidden = gate_up_proj.shape
        n_inter = two_i // 2
        g = grad_out.to(x.dtype).contiguous()
        d_hidden = d_gate_up = d_down = d_weights = None
        need_hidden, need_gate_up, need_down, _, need_weights, _ = ctx.needs_input_grad
        if need_weights:
            d_weights = routing_weight_grad(g, y, routing, weights_dtype).view(n_tokens, top_k)
        if need_down:
            d_down = expert_weight_grad(g, act, routing, n_experts, down_proj.dtype, gather_a=True, scale=weights)
        if need_hidden or need_gate_up:
            # d act = (w g[token]) @ down_e: down_e is (H, I), so n = I runs along its stride(2), k = H along stride(1)
            d_pre = grouped_matmul(g, down_proj, routing, n_inter, n_hidden, down_proj.stride(2), down_proj.stride(1),
                                   gather=True, scale=weights, pre=pre)
            if need_gate_up:
                d_gate_up = expert_weight_grad(d_pre, x, routing, n_experts, gate_up_proj.dtype, gather_b=True)
            if need_hidden:
                rows = grouped_matmul(d_pre, gate_up_proj, routing, n_hidden, two_i, gate_up_proj.stride(2),
                                      gate_up_proj.stride(1))
                d_hidden = combine(rows, None, routing, n_tokens, hidden_dtype)
        return d_hidden, d_gate_up, d_down, None, d_weights, None


# ----------------------------------------------------------------------------- PyTorch path

def moe_experts_torch(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    """The loop over experts on rows sorted by expert once (a stable sort; one host read of the counts),
    so each expert takes a contiguous slice instead of scanning all T x k ids; autograd backward."""
    n_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()
    token = order // top_k
    x = hidden.to(gate_up_proj.dtype)[token]
    rows = []
    # split, not slicing: the backward of one split joins the pieces once (a slice's backward
    # would write a zero-filled gradient of all P rows per expert); unbind likewise for the weights
    for part, w_gate_up, w_down in zip(x.split(counts), gate_up_proj.unbind(0), down_proj.unbind(0)):
        if part.shape[0]:
            gate, up = torch.nn.functional.linear(part, w_gate_up).chunk(2, dim=-1)
            rows.append(torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down))
    y = torch.cat(rows) if rows else x.new_zeros(0, hidden.shape[1])
    y = y * topk_weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(hidden).index_add(0, token, y.to(hidden.dtype))


# ----------------------------------------------------------------------------- public op

def _validate(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    if hidden.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"moe_experts: expected hidden (T, H), gate_up_proj (E, 2I, H), down_proj (E, H, I); got "
                         f"{tuple(hidden.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}")
    n_experts, two_i, n_hidden = gate_up_proj.shape
    if two_i % 2 or hidden.shape[1] != n_hidden or tuple(down_proj.shape) != (n_experts, n_hidden, two_i // 2):
        raise ValueError(f"moe_experts: gate_up_proj {tuple(gate_up_proj.shape)} must be (E, 2I, H) with H = hidden's "
                         f"{hidden.shape[1]} and down_proj {tuple(down_proj.shape)} must be (E, H, I)")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe_experts: topk_ids and topk_weights must both be (T, k) with T = {hidden.shape[0]}; got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"moe_experts: topk_ids must hold integer expert ids, got {topk_ids.dtype}")
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(topk_ids.min()), int(topk_ids.max())
        if low < 0 or high >= n_experts:
            raise ValueError(f"moe_experts: topk_ids must lie in [0, {n_experts}); found {low if low < 0 else high}")


def moe_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The MoE experts' output (T, H) in hidden's dtype (see the module docstring).
    Expert ids are checked on CPU tensors only (a check on CUDA would sync the host)."""
    _validate(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    if hidden.shape[0] == 0:
        # no rows: zeros, still attached to every input so that backward gives them zero gradients
        return hidden * 0 + (0 * (gate_up_proj.sum() + down_proj.sum() + topk_weights.sum())).to(hidden.dtype)
    triton_ok = gate_up_proj.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if not triton_ok or not use_triton(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
        return moe_experts_torch(hidden, gate_up_proj, down_proj, topk_ids, topk_weights)
    # the backward's saved activations, only when a gradient will be asked for (not while sampling)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, gate_up_proj, down_proj, topk_weights))
    return _MoeExperts.apply(hidden, gate_up_proj.contiguous(), down_proj.contiguous(), topk_ids, topk_weights, save)
