"""One decode step of attention for G = 8 samples of one group over a shared prefix, the
default model's heads (9 query / 3 KV, head dim 64), fp32, beside the naive path where each
sample attends to its own copy of prefix + own KV with SDPA (what a plain batched KV cache
does). Also, in the same run: the prefix's two matmuls alone (the BLAS floor of the shared
path), one read of the prefix KV (the memory floor), and the default model's other decode
work for these layers (projections + MLP for 8 tokens, plus the LM head with all layers) to size attention's
share of a step.

Default: one layer, prefixes 2k and 8k. SPELL_BENCH_FULL=1: all 30 layers (separate caches
per layer, ~3 GB for the naive path at 8k). On CUDA the shared path runs the Triton kernels
(bench/gpu_decode.sh).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from spell_kernels import decode_attn_shared_prefix

FULL = os.environ.get("SPELL_BENCH_FULL") == "1"
LAYERS = 30 if FULL else 1
ROUNDS = 5 if FULL else 10
HQ, HKV, D = 9, 3, 64
HIDDEN, FFN = 576, 1536  # SmolLM2-135M
SAMPLES, OWN = 8, 64  # G samples of one group, each with 64 generated tokens so far
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
VARIANTS = ["naive_sdpa_per_sample", "shared_prefix", "prefix_matmuls_only", "kv_read_floor", "linear_rest"]


def _layer(prefix, gen):
    slots = prefix + SAMPLES * OWN
    k = torch.randn(slots, HKV, D, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(slots, HKV, D, generator=gen).to(DEVICE, DTYPE)
    return k, v


@pytest.fixture(scope="module", params=[2048, 8192], ids=lambda p: f"prefix{p}")
def setup(request):
    prefix = request.param
    gen = torch.Generator().manual_seed(0)
    layers = [_layer(prefix, gen) for _ in range(LAYERS)]
    q = torch.randn(SAMPLES, HQ, D, generator=gen).to(DEVICE, DTYPE)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    tables = (as_dev([0]), as_dev([prefix]), as_dev([0, SAMPLES]),
              as_dev([prefix + i * OWN for i in range(SAMPLES)]), as_dev([OWN] * SAMPLES))
    return prefix, layers, q, tables


def _naive_caches(prefix, layers):
    """Each sample's own contiguous cache [prefix + own]: (B, Hkv, L, D) per layer."""
    caches = []
    for k, v in layers:
        per_sample = [torch.cat([k[:prefix], k[prefix + i * OWN:prefix + (i + 1) * OWN]]) for i in range(SAMPLES)]
        per_sample_v = [torch.cat([v[:prefix], v[prefix + i * OWN:prefix + (i + 1) * OWN]]) for i in range(SAMPLES)]
        caches.append((torch.stack(per_sample).transpose(1, 2).contiguous(),
                       torch.stack(per_sample_v).transpose(1, 2).contiguous()))
    return caches


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step(benchmark, setup, variant):
    prefix, layers, q, tables = setup
    kv_bytes = 2 * HKV * D * q.element_size() * LAYERS
    benchmark.group = f"decode attention, G={SAMPLES} samples, prefix {prefix}, own {OWN}, {LAYERS} layer(s), " \
                      f"{HQ}/{HKV} heads D={D}, {DTYPE} {DEVICE}"
    if variant == "naive_sdpa_per_sample":
        caches = _naive_caches(prefix, layers)
        q4 = q[:, :, None]

        def run():
            return [F.scaled_dot_product_attention(q4, k, v, enable_gqa=True) for k, v in caches]
        benchmark.extra_info["kv_bytes_read"] = kv_bytes * SAMPLES * (prefix + OWN)
    elif variant == "shared_prefix":
        hints = dict(max_group_queries=SAMPLES, max_prefix_len=prefix, max_own_len=OWN)

        def run():
            return [decode_attn_shared_prefix(q, k, v, *tables, **hints) for k, v in layers]
        benchmark.extra_info["kv_bytes_read"] = kv_bytes * (prefix + SAMPLES * OWN)
        k0, v0 = _naive_caches(prefix, layers[:1])[0]
        expected = F.scaled_dot_product_attention(q[:, :, None].float(), k0.float(), v0.float(), enable_gqa=True)
        got = decode_attn_shared_prefix(q, *layers[0], *tables).float()
        tol = 1e-4 if DTYPE == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected[:, :, 0], atol=tol, rtol=tol)
    elif variant == "prefix_matmuls_only":
        q_rows = q.view(SAMPLES, HKV, HQ // HKV, D).transpose(0, 1).reshape(HKV, -1, D)

        def run():
            return [torch.matmul(torch.matmul(q_rows, k[:prefix].transpose(0, 1).transpose(1, 2)),
                                 v[:prefix].transpose(0, 1)) for k, v in layers]
        benchmark.extra_info["kv_bytes_read"] = kv_bytes * prefix
    elif variant == "kv_read_floor":
        def run():
            return [(k[:prefix].sum(), v[:prefix].sum()) for k, v in layers]
        benchmark.extra_info["kv_bytes_read"] = kv_bytes * prefix
    else:  # linear_rest: q/k/v/o projections + gated MLP of each layer for the 8 new tokens
        gen = torch.Generator().manual_seed(1)
        shapes = [(HIDDEN, HQ * D), (HIDDEN, 2 * HKV * D), (HQ * D, HIDDEN), (HIDDEN, 2 * FFN), (FFN, HIDDEN)]
        weights = [[torch.randn(*s, generator=gen).to(DEVICE, DTYPE) / s[0] ** 0.5 for s in shapes]
                   for _ in range(LAYERS)]
        x = torch.randn(SAMPLES, HIDDEN, generator=gen).to(DEVICE, DTYPE)
        # the LM head runs once per step: counted with all layers only
        lm_head = torch.randn(HIDDEN, 49152, generator=gen).to(DEVICE, DTYPE) if FULL else None

        def run():
            h = x
            for wq, wkv, wo, w_up, w_down in weights:
                attn = (h @ wq) @ wo
                h @ wkv
                gate, up = (h @ w_up).chunk(2, -1)
                h = h + attn + (F.silu(gate) * up) @ w_down
            return h @ lm_head if lm_head is not None else h

    def timed():
        with torch.no_grad():
            out = run()
        _sync()
        return out

    result = benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert result is not None
    if benchmark.stats is not None and "kv_bytes_read" in benchmark.extra_info:  # None under --benchmark-disable
        benchmark.extra_info["kv_GB_per_s"] = benchmark.extra_info["kv_bytes_read"] / benchmark.stats.stats.median / 1e9
