#!/usr/bin/env bash
# Decode attention over a shared prefix on a GPU, in one command (for a session with a GPU):
#   bench/gpu_decode.sh            # from the repository root, after `make test` created .venv
# 1. pytest-benchmark: the Triton kernels vs per-sample SDPA, 30 layers, prefixes 2k / 8k
#    (bench/test_bench_decode.py; it also checks the Triton output against SDPA).
# 2. Achieved KV bandwidth of decode_attn_shared_prefix beside the measured device copy
#    bandwidth, at long prefixes, for the default model's heads and a 7B-like head layout.
# DRY_RUN=1 runs part 2 on CPU through the Triton interpreter at tiny sizes (checks the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

if [ "${DRY_RUN:-0}" != "1" ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
  SPELL_BENCH_FULL=1 "$PY" -m pytest bench/test_bench_decode.py -q -p no:cacheprovider --benchmark-enable \
    --benchmark-columns=min,median,rounds --benchmark-sort=name
fi

if [ "${DRY_RUN:-0}" = "1" ]; then export TRITON_INTERPRET=1 SPELL_KERNELS=triton; fi
"$PY" - <<'EOF'
import os
import time

import torch
import torch.nn.functional as F

from spell_kernels import decode_attn_shared_prefix

dry = os.environ.get("DRY_RUN") == "1"
dev = "cpu" if dry else "cuda"
dtype = torch.float16 if dry else torch.bfloat16


def timed(fn, iters):
    fn()
    if dry:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


copy_bytes = (1 << 20) if dry else (1 << 30)
src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy_bw = 2 * copy_bytes / timed(lambda: dst.copy_(src), 2 if dry else 20)  # read + write
print(f"device copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s")

samples, own = 8, 64
heads = [(9, 3, 64)] if dry else [(9, 3, 64), (28, 4, 128)]
prefixes = [130] if dry else [8192, 32768, 131072]
groups_list = [1, 2] if dry else [1, 8]
print(f"{'heads':>10} {'groups':>6} {'prefix':>7} {'time us':>9} {'KV GB/s':>8} {'% of copy':>9} "
      f"{'SDPA/sample us':>15} {'speedup':>7}")
for hq, hkv, d in heads:
    for groups in groups_list:
        for prefix in prefixes:
            b = groups * samples
            slots = groups * prefix + b * own
            k = torch.randn(slots, hkv, d, device=dev, dtype=dtype)
            v = torch.randn(slots, hkv, d, device=dev, dtype=dtype)
            q = torch.randn(b, hq, d, device=dev, dtype=dtype)
            i32 = dict(dtype=torch.int32, device=dev)
            prefix_start = torch.arange(groups, **i32) * prefix
            prefix_len = torch.full((groups,), prefix, **i32)
            cu = torch.arange(groups + 1, **i32) * samples
            own_start = groups * prefix + torch.arange(b, **i32) * own
            own_len = torch.full((b,), own, **i32)
            args = (q, k, v, prefix_start, prefix_len, cu, own_start, own_len)
            hints = dict(max_group_queries=samples, max_prefix_len=prefix, max_own_len=own)
            t = timed(lambda: decode_attn_shared_prefix(*args, **hints), 3 if dry else 50)
            kv_bytes = (groups * prefix + b * own) * hkv * d * 2 * k.element_size()
            # naive: every sample's own copy of prefix + own, SDPA (one group's worth, scaled by groups)
            kn = torch.cat([k[:prefix].unsqueeze(0).expand(samples, -1, -1, -1),
                            k[groups * prefix:groups * prefix + samples * own].view(samples, own, hkv, d)], 1)
            vn = torch.cat([v[:prefix].unsqueeze(0).expand(samples, -1, -1, -1),
                            v[groups * prefix:groups * prefix + samples * own].view(samples, own, hkv, d)], 1)
            kn, vn = kn.transpose(1, 2).contiguous(), vn.transpose(1, 2).contiguous()
            qn = q[:samples, :, None]
            t_naive = groups * timed(lambda: F.scaled_dot_product_attention(qn, kn, vn, enable_gqa=True),
                                     3 if dry else 50)
            got = decode_attn_shared_prefix(*args, **hints)[:samples].float()
            want = F.scaled_dot_product_attention(qn.float(), kn.float(), vn.float(), enable_gqa=True)[:, :, 0]
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
            print(f"{hq:>4}/{hkv}/{d:<3} {groups:>6} {prefix:>7} {t * 1e6:>9.1f} {kv_bytes / t / 1e9:>8.0f} "
                  f"{100 * kv_bytes / t / copy_bw * 2:>8.0f}% {t_naive * 1e6:>15.1f} {t_naive / t:>6.1f}x")
            del k, v, kn, vn
print("(% of copy: KV bytes read per second vs half the copy's read+write rate, i.e. vs its read rate)")
EOF
