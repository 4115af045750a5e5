"""The CPU-runnable pieces of bench/gpu_attention.py (the GPU benchmark): FLOP counts, the
markdown tables, the variant switch, and one tiny timing pass through the interpreter."""
import subprocess

import pytest
import torch

from bench import gpu_attention as ga
from spell_kernels import flash_attn


def test_gpu_attention_script_is_valid_bash():
    subprocess.run(["bash", "-n", "bench/gpu_attention.sh"], check=True)


def test_causal_flops_by_hand():
    # 1 sequence, 1 head, L = 2, D = 1: QK^T and PV each over half the 2x2 scores (2 MACs of
    # 2 FLOPs): 8; the backward counts 2.5x the forward on top
    assert ga.causal_flops(1, 1, 2, 1) == 8.0
    assert ga.causal_flops(1, 1, 2, 1, backward=True) == 28.0
    assert ga.causal_flops(2, 16, 4096, 128) == 4 * 2 * 16 * 4096 * 4096 * 128 / 2


def test_throughput_table_ratios():
    rows = [dict(L=4096, batch=16, what="TMA, deterministic", fwd=300.0, fwd_bwd=150.0),
            dict(L=4096, batch=16, what="SDPA", fwd=400.0, fwd_bwd=200.0)]
    table = ga.throughput_table(rows, peak=600.0)
    ours = next(line for line in table.splitlines() if "TMA, deterministic" in line)
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells == ["4096", "16", "TMA, deterministic", "300", "0.75", "0.50", "150", "0.75", "0.25"]
    assert "600 TFLOP/s" in table
    nan_row = ga.throughput_table([dict(L=1, batch=1, what="x", fwd=float("nan"), fwd_bwd=1.0)], 1.0)
    assert "| — |" in nan_row  # no SDPA row: no ratio, no crash


def test_sweep_table():
    table = ga.sweep_table([("dq", {"BLOCK_M": 128}, 1.234, True), ("dq", {"BLOCK_M": 64}, "skipped", False)])
    assert "| dq | {'BLOCK_M': 128} | 1.23 | shipped |" in table and "| skipped |" in table


def test_variant_switches_and_restores():
    before_tma, before = flash_attn.USE_TMA, dict(flash_attn.GPU_CONFIGS["dq"])
    cfg = dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=1)
    with ga.variant(use_tma=False, configs={"dq": {128: cfg}}):
        assert flash_attn.USE_TMA is False and flash_attn.GPU_CONFIGS["dq"][128] == cfg
        assert flash_attn.GPU_CONFIGS["dq"][64] == before[64]
    assert flash_attn.USE_TMA is before_tma and flash_attn.GPU_CONFIGS["dq"] == before


def test_sweep_covers_the_shipped_configs():
    for kind, candidates in ga.CONFIG_CANDIDATES.items():
        assert flash_attn.GPU_CONFIGS[kind][128] in candidates, kind


def test_attention_rows_are_the_causal_flops_over_the_measured_time_of_each_variant(triton_path, monkeypatch):
    """Each variant's kernels run (on the interpreter) under its own USE_TMA; with every timing
    fixed at 0.25 s, L = 16, 1 head, D = 32: forward 4 x 16 x 16 x 32 / 2 = 16,384 FLOPs -> 65,536
    FLOP/s, forward + backward 3.5 x that = 229,376 FLOP/s (the rows hold TFLOP/s)."""
    monkeypatch.setattr(ga, "dev", "cpu")
    monkeypatch.setattr(ga, "dry", True)
    monkeypatch.setattr(flash_attn, "INTERPRET_CONFIG", dict(BLOCK_M=16, BLOCK_N=16))
    use_tma = []

    def timed(fn):
        fn()
        use_tma.append(flash_attn.USE_TMA)
        return 0.25

    monkeypatch.setattr(ga, "timed", timed)
    rows = ga.attention_rows(16, heads=1, d=32, dtype=torch.float16)
    assert [r["what"] for r in rows] == [name for name, _, _ in ga.VARIANTS] + ["SDPA"]
    assert use_tma[:6] == [None, None, None, None, False, False]  # TMA, TMA, pointers; forward then both
    for r in rows:
        assert r["batch"] == 1 and r["L"] == 16
        assert r["fwd"] == pytest.approx(65536 / 1e12, rel=1e-12)
        assert r["fwd_bwd"] == pytest.approx(229376 / 1e12, rel=1e-12)


@pytest.mark.parametrize("kind", ["fwd_tma", "dkdv_atomic"])
def test_new_kinds_have_every_head_dim(kind):
    assert set(flash_attn.GPU_CONFIGS[kind]) == set(flash_attn.GPU_CONFIGS["fwd"])


def test_config_sweep_stops_at_its_deadline(triton_path, monkeypatch):
    # past the deadline every candidate is listed as skipped (and nothing is left patched)
    monkeypatch.setattr(ga, "dev", "cpu")
    monkeypatch.setattr(ga, "dry", True)
    monkeypatch.setattr(flash_attn, "INTERPRET_CONFIG", dict(BLOCK_M=32, BLOCK_N=32))
    before = {kind: dict(flash_attn.GPU_CONFIGS[kind]) for kind in ga.CONFIG_CANDIDATES}
    rows = ga.config_sweep(deadline=0.0)
    assert len(rows) == sum(len(c) for c in ga.CONFIG_CANDIDATES.values())
    assert all(ms == "skipped (time budget)" for _, _, ms, _ in rows)
    assert sum(shipped for *_, shipped in rows) == len(ga.CONFIG_CANDIDATES)
    assert {kind: flash_attn.GPU_CONFIGS[kind] for kind in ga.CONFIG_CANDIDATES} == before
