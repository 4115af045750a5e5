"""moe_experts (Triton grouped GEMM, interpreted on CPU; and the PyTorch loop) against a float64
oracle written here token by token (no sort, no index_add): forward and the gradients of all
four differentiable inputs, on awkward routings."""
import pytest
import torch
import torch.nn.functional as F

import spell_kernels as sk
from spell_kernels import moe, moe_routing

H, I = 32, 16  # one N block of the interpreter's tiles (32), two K blocks of the weight gradient (16)


def _oracle(hidden, gate_up_proj, down_proj, topk_ids, topk_weights):
    """Each token, each slot, its expert's SwiGLU MLP, summed: the definition, in the inputs' dtype."""
    rows = []
    for t in range(hidden.shape[0]):
        acc = torch.zeros_like(hidden[t])
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (gate_up_proj[e] @ hidden[t]).chunk(2)
            acc = acc + topk_weights[t, j] * (down_proj[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows) if rows else hidden * 0


def _inputs(ids, n_experts, seed=0, hidden_size=H, inter=I):
    gen = torch.Generator().manual_seed(seed)
    n_tokens = ids.shape[0]
    hidden = torch.randn(n_tokens, hidden_size, generator=gen)
    gate_up = torch.randn(n_experts, 2 * inter, hidden_size, generator=gen) / hidden_size ** 0.5
    down = torch.randn(n_experts, hidden_size, inter, generator=gen) / inter ** 0.5
    weights = torch.rand(ids.shape, generator=gen) + 0.1
    grad_out = torch.randn(n_tokens, hidden_size, generator=gen)
    return (hidden, gate_up, down, ids, weights), grad_out


def _run(fn, inputs, grad_out, dtype=None):
    """(out, d hidden, d gate_up, d down, d weights)."""
    hidden, gate_up, down, ids, weights = inputs
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (hidden, gate_up, down, weights)]
    out = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check(got, want, rtol=2e-5):
    names = ("out", "d_hidden", "d_gate_up_proj", "d_down_proj", "d_topk_weights")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (g.double() - w).abs().max().item() if w.numel() else 0.0
        assert err <= rtol * scale + 1e-12, f"{name}: max error {err:.3g}, {err / max(scale, 1e-30):.3g} relative"


def _ids(case):
    """(topk_ids, number of experts) of a named routing."""
    gen = torch.Generator().manual_seed(1)
    bm = moe.INTERPRET_BLOCK_M
    if case == "one token":
        return torch.tensor([[3, 1]]), 4
    if case == "all tokens on one expert":
        return torch.full((21, 1), 2), 4
    if case == "empty first and last expert":
        return torch.randint(1, 4, (13, 2), generator=gen), 5
    if case == "loads at block size - 1, =, + 1":
        ids = torch.cat([torch.full((bm - 1,), 0), torch.full((bm,), 1), torch.full((bm + 1,), 2)])
        return ids[torch.randperm(ids.numel(), generator=gen)][:, None], 3
    if case == "k = E":
        return torch.stack([torch.randperm(4, generator=gen) for _ in range(9)]), 4
    if case == "replayed ids, repeats within a token":
        ids = torch.randint(0, 6, (11, 3), generator=gen)
        ids[0] = torch.tensor([5, 5, 0])
        return ids, 6
    raise KeyError(case)


CASES = ["one token", "all tokens on one expert", "empty first and last expert", "loads at block size - 1, =, + 1",
         "k = E", "replayed ids, repeats within a token"]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_the_oracle_and_unused_experts_get_exact_zero_gradients(triton_path, case):
    ids, n_experts = _ids(case)
    inputs, grad_out = _inputs(ids, n_experts)
    got = _run(sk.moe_experts, inputs, grad_out)
    _check(got, _run(_oracle, inputs, grad_out, torch.float64))
    unused = [e for e in range(n_experts) if not (ids == e).any()]
    for e in unused:
        assert torch.equal(got[2][e], torch.zeros_like(got[2][e])) and torch.equal(got[3][e], torch.zeros_like(got[3][e]))
    assert bool(unused) == (case in ("one token", "all tokens on one expert", "empty first and last expert"))


def test_several_tiles_along_every_dimension_with_ragged_edges(triton_path, monkeypatch):
    """Tiles of 16 on H 40 and I 24: every matmul loops over several K steps and N blocks, each
    with a partial last one; experts get 1 to 3 row tiles."""
    small = dict(BLOCK_N=16, BLOCK_K=16)
    monkeypatch.setattr(moe, "INTERPRET_CONFIGS", {"gate_up": small, "matmul": small, "combine": dict(BLOCK=16),
                                                   "weight_grad": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)})
    ids = torch.randint(0, 3, (19, 2), generator=torch.Generator().manual_seed(6))
    inputs, grad_out = _inputs(ids, 3, seed=7, hidden_size=40, inter=24)
    _check(_run(sk.moe_experts, inputs, grad_out), _run(_oracle, inputs, grad_out, torch.float64))


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_zero_tokens_give_empty_output_and_zero_gradients(monkeypatch, path):
    monkeypatch.setenv("SPELL_KERNELS", path)
    ids = torch.zeros(0, 2, dtype=torch.long)
    inputs, grad_out = _inputs(ids, 3)
    out, d_hidden, d_gate_up, d_down, d_weights = _run(sk.moe_experts, inputs, grad_out)
    assert out.shape == (0, H) and d_hidden.shape == (0, H) and d_weights.shape == (0, 2)
    assert not d_gate_up.any() and not d_down.any()


def test_reruns_are_bitwise_equal(triton_path):
    ids = torch.randint(0, 5, (40, 2), generator=torch.Generator().manual_seed(2))
    inputs, grad_out = _inputs(ids, 5, seed=3)
    first, second = _run(sk.moe_experts, inputs, grad_out), _run(sk.moe_experts, inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_the_forward_reads_no_device_data_on_the_host(triton_path, monkeypatch):
    """What a CUDA graph needs: no .item() / .tolist() / bool() of a tensor between the launches."""
    ids = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(4))
    (hidden, gate_up, down, ids, weights), _ = _inputs(ids, 4)
    want = _oracle(hidden.double(), gate_up.double(), down.double(), ids, weights.double())
    moe._validate(hidden, gate_up, down, ids, weights)  # the CPU-only id check is the one host read

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync in the forward")

    for name in ("item", "tolist", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(moe, "_validate", lambda *args: None)
    out = sk.moe_experts(hidden, gate_up, down, ids, weights)
    monkeypatch.undo()
    _check([out], [want])


@pytest.mark.parametrize("case", CASES)
def test_cpu_path_matches_the_oracle(torch_path, case):
    ids, n_experts = _ids(case)
    inputs, grad_out = _inputs(ids, n_experts)
    _check(_run(sk.moe_experts, inputs, grad_out), _run(_oracle, inputs, grad_out, torch.float64))


def test_bad_inputs_name_the_argument():
    ids = torch.tensor([[0, 4]])
    (hidden, gate_up, down, _, weights), _ = _inputs(ids, 4)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 4\); found 4"):
        sk.moe_experts(hidden, gate_up, down, ids, weights)
    with pytest.raises(ValueError, match="down_proj"):
        sk.moe_experts(hidden, gate_up, down.transpose(1, 2), ids.clamp(max=3), weights)
    with pytest.raises(TypeError, match="integer expert ids"):
        sk.moe_experts(hidden, gate_up, down, ids.float(), weights)


def test_routing_sorts_pairs_stably_by_expert_with_its_inverse(triton_path):
    n_experts, bm = 7, 16
    ids = torch.randint(0, n_experts, (45, 3), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = torch.where(ids[:, 0] == 6, 5, ids[:, 0])  # expert 6: one of the last, few pairs
    ids[ids == 0] = 1  # expert 0 empty
    routing = moe_routing.moe_routing(ids, n_experts, bm)
    flat = ids.reshape(-1)
    want = torch.tensor(sorted(range(flat.numel()), key=lambda p: (int(flat[p]), p)), dtype=torch.int32)
    assert torch.equal(routing.sorted_pairs, want)
    assert torch.equal(routing.sorted_pairs[routing.inverse.long()], torch.arange(flat.numel(), dtype=torch.int32))
    counts = torch.tensor([(flat == e).sum() for e in range(n_experts)])
    assert torch.equal(routing.expert_end - routing.expert_start, counts.int())
    assert torch.equal(routing.tile_end - routing.tile_start, ((counts + bm - 1) // bm).int())
    assert int(routing.tile_end[-1]) <= routing.max_tiles
