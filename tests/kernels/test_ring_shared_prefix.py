"""Shared-prefix groups under ring attention on 2 and 4 gloo processes against one process.

The oracle is dense float64 attention over the unpadded batch with the shared-prefix mask
written out here (a response row sees its own segment causally and all of its prompt), its
gradients by autograd. Every segment is padded at its end with random values (the ranks must
ignore them: a prompt's pads are visible to nothing) and cut zigzag with positions built by
hand, so the test does not rely on the sharding helpers.
"""
import pytest
import torch

from spell_kernels.ring_shared_prefix import RingSharedPrefixPlan, ring_shared_prefix_attn_func
from spell_kernels.shared_prefix import SharedPrefixLayout
from tests.kernels.gloo_ranks import padded_lengths, run_on_gloo_ranks, shard_positions

# (prompt, [responses]) or a plain sequence's length. The 3-token prompt leaves rank 3 of 4
# with pad rows only (an empty prefix block); the 2-token response is shorter than 2R.
GROUPS = [(13, [5, 1, 7]), 9, (3, [4, 6]), (21, [2])]
HEADS, HEAD_DIM = (4, 2), 8


def layout():
    lay = SharedPrefixLayout.from_groups(GROUPS)
    return lay.cu_seqlens.diff().tolist(), lay.parent.tolist()


def dense_oracle(q, k, v, dout, lengths, parent):
    """out and (dq, dk, dv) of shared-prefix attention, dense, float64."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(seg.numel())
    par = torch.tensor(parent)[seg]
    allowed = ((seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])) | (par[:, None] == seg[None, :])
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = torch.einsum("thd,shd->hts", q, kk) / HEAD_DIM ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("hts,shd->thd", probs, vv)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def padded_rows(lengths, world_size):
    """Index of every real token in the padded batch, and a mask of the padded batch's real rows."""
    padded = padded_lengths(lengths, world_size)
    real, start = [], 0
    for n, p in zip(lengths, padded):
        real += range(start, start + n)
        start += p
    mask = torch.zeros(start, dtype=torch.bool)
    mask[real] = True
    return torch.tensor(real), mask


def make_inputs(world_size, seed=0):
    lengths, parent = layout()
    gen = torch.Generator().manual_seed(seed)
    real, mask = padded_rows(lengths, world_size)
    hq, hkv = HEADS
    q, k, v = (torch.randn(mask.numel(), h, HEAD_DIM, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(mask.numel(), hq, HEAD_DIM, generator=gen, dtype=torch.float64)
    dout[~mask] = 0  # pad rows feed no loss
    return dict(lengths=lengths, parent=parent, q=q, k=k, v=v, dout=dout)


def _rank(rank, world_size, inputs_path):
    data = torch.load(inputs_path)
    local = shard_positions(padded_lengths(data["lengths"], world_size), rank, world_size)
    plan = RingSharedPrefixPlan.build(data["lengths"], data["parent"], rank, world_size)
    q, k, v = (data[x][local].requires_grad_(True) for x in ("q", "k", "v"))
    out = ring_shared_prefix_attn_func(q, k, v, plan)
    out.backward(data["dout"][local])
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_shared_prefix_matches_single_process_fp64(world_size, tmp_path):
    data = make_inputs(world_size)
    torch.save(data, tmp_path / "inputs.pt")
    shards = run_on_gloo_ranks(_rank, world_size, tmp_path, str(tmp_path / "inputs.pt"))
    padded = padded_lengths(data["lengths"], world_size)
    whole = {key: torch.zeros_like(data["q" if key in ("out", "dq") else "k"]) for key in ("out", "dq", "dk", "dv")}
    for r in range(world_size):
        for key in whole:
            whole[key][shard_positions(padded, r, world_size)] = shards[r][key]

    real, mask = padded_rows(data["lengths"], world_size)
    exact = dense_oracle(*(data[x][real] for x in ("q", "k", "v", "dout")), data["lengths"], data["parent"])
    for key, ref in zip(("out", "dq", "dk", "dv"), exact):
        torch.testing.assert_close(whole[key][real], ref, rtol=1e-10, atol=1e-12, msg=key)
    # no real query attended to a pad key: the pads' K/V got no gradient
    assert float(whole["dk"][~mask].abs().max()) == 0.0 and float(whole["dv"][~mask].abs().max()) == 0.0


def test_ring_of_one_equals_shared_prefix_attention():
    data = make_inputs(world_size=1, seed=3)
    lengths, parent = data["lengths"], data["parent"]
    plan = RingSharedPrefixPlan.build(lengths, parent, 0, 1)
    q, k, v = (data[x].requires_grad_(True) for x in ("q", "k", "v"))
    out = ring_shared_prefix_attn_func(q, k, v, plan)
    out.backward(data["dout"])
    real, _ = padded_rows(lengths, 1)  # a ring of one still pads every segment to an even length
    exact = dense_oracle(*(data[x].detach()[real] for x in ("q", "k", "v", "dout")), lengths, parent)
    for got, ref in zip((out, q.grad, k.grad, v.grad), exact):
        torch.testing.assert_close(got.detach()[real], ref, rtol=1e-10, atol=1e-12)


def test_plan_by_hand():
    """Prompt 3 + responses 4, 2 on 2 ranks: segments padded to 4, 4, 4 (2 local rows each).
    Rank 1 holds prompt chunks 1 and 2 = positions 1 and 2: both real; rank 0 holds chunks 0
    and 3 = positions 0 and 3, the latter a pad: only local row 0 is a real prompt key."""
    plan = RingSharedPrefixPlan.build([3, 4, 2], [-1, 0, 0], rank=0, world_size=2)
    assert plan.cu_seqlens.tolist() == [0, 2, 4, 6]
    assert plan.resp_rows.tolist() == [2, 3, 4, 5] and plan.cu_resp.tolist() == [0, 4]
    assert plan.prefix_rows[0].tolist() == [0] and plan.prefix_rows[1].tolist() == [0, 1]
    assert [c.tolist() for c in plan.cu_prefix] == [[0, 1], [0, 2]]


def test_responses_must_follow_their_prompt():
    with pytest.raises(ValueError, match="does not follow its prompt"):
        RingSharedPrefixPlan.build([3, 5, 4], [-1, -1, 0], 0, 2)
