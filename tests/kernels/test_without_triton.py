"""spell_kernels without Triton installed (macOS, Windows): the package imports and every public
op runs its PyTorch path on CPU tensors, giving what it gives with Triton installed; a Triton
path is refused with an error that says what to install.

The child process hides Triton behind a sys.meta_path finder that fails `import triton`; its
results are compared to the same calls in this process (Triton installed, PyTorch path), and
the attention to the float64 reference."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
import torch
torch.set_num_threads(int(sys.argv[2]))  # the parent's count: CPU reductions split by thread count
from tests.kernels.test_without_triton import every_op, triton_refusals
results = every_op()
results["refusals"] = triton_refusals()
results["triton_imported"] = any(m == "triton" or m.startswith("triton.") for m in sys.modules)
torch.save(results, sys.argv[1])
"""


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def every_op():
    """Every public op of spell_kernels on small CPU inputs (the PyTorch path); name -> result."""
    import spell_kernels as sk
    from spell_kernels.integrations.transformers import register

    g = torch.Generator().manual_seed(0)
    out = {}
    cu = _cu([5, 3])
    q, k, v = (torch.randn(8, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    attn = sk.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True)
    attn.sum().backward()
    out["flash_attn_varlen_func"] = (attn.detach(), q.grad, k.grad, v.grad)
    out["attn_inputs"] = (q.detach(), k.detach(), v.detach())

    layout = sk.SharedPrefixLayout.from_groups([(4, [2, 2])])
    out["shared_prefix_attn_func"] = sk.shared_prefix_attn_func(q, k, v, layout.cu_seqlens, layout.max_seqlen,
                                                                layout.parent).detach()
    out["SharedPrefixAttention"] = sk.SharedPrefixAttention(layout)(0, q, k, v).detach()
    out["ring_flash_attn_varlen_func"] = sk.ring_flash_attn_varlen_func(q, k, v, _cu([4, 4]), 4).detach()
    merged = sk.merge_attn_states(*(torch.randn(3, 2, 8, generator=g), torch.randn(2, 3, generator=g)) * 2)
    out["merge_attn_states"] = merged
    out["decode_attn_shared_prefix"] = sk.decode_attn_shared_prefix(
        torch.randn(2, 4, 16, generator=g), k.detach(), v.detach(), torch.tensor([0]), torch.tensor([4]),
        torch.tensor([0, 2]), torch.tensor([4, 6]), torch.tensor([2, 2]))

    cu_pad = _cu([4, 8])
    x = torch.arange(12)
    padded, cu_padded = sk.zigzag_pad(torch.arange(7), _cu([3, 4]), 2)
    out["zigzag"] = (sk.zigzag_shard(x, cu_pad, 1, 2), sk.zigzag_cu_seqlens(cu_pad, 2)[0],
                     sk.zigzag_unshard(x, cu_pad), padded, sk.zigzag_unpad(padded, cu_padded, _cu([3, 4])))

    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (6,), generator=g)
    out["fused_linear_logprob"] = sk.fused_linear_logprob(hidden, weight, targets, return_entropy=True)
    loss, stats = sk.policy_loss(hidden, weight, targets, torch.full((6,), -3.0), torch.randn(6, generator=g),
                                 torch.ones(6, dtype=torch.bool))
    loss.backward()
    out["policy_loss"] = (loss.detach(), hidden.grad, stats)
    advantages = sk.group_advantages(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    out["group_advantages"] = advantages
    out["broadcast_to_tokens"] = sk.broadcast_to_tokens(advantages, _cu([2, 1, 3, 2]))

    gate_up = torch.randn(4, 12, 8, generator=g, requires_grad=True)
    moe_out = sk.moe_experts(hidden.detach(), gate_up, torch.randn(4, 8, 6, generator=g), torch.tensor([[0, 3]] * 6),
                             torch.rand(6, 2, generator=g))
    moe_out.sum().backward()
    out["moe_experts"] = (moe_out.detach(), gate_up.grad)

    lengths = torch.tensor([3, 1, 2])
    packed = sk.pack(torch.arange(9).reshape(3, 3), lengths)
    out["packing"] = (packed, sk.unpack(packed, sk.cu_seqlens_from_lengths(lengths)),
                      sk.position_ids_from_cu_seqlens(sk.cu_seqlens_from_lengths(lengths)),
                      sk.partition_by_token_budget([5, 9, 3, 7], 12))
    out["integration_registered"] = register()
    return out


def triton_refusals():
    """The error of each way to ask for a Triton path."""
    import spell_kernels as sk
    from spell_kernels import flash_attn

    errors = {}
    os.environ["SPELL_KERNELS"] = "triton"
    os.environ["TRITON_INTERPRET"] = "1"
    x = torch.zeros(4, 2, 8)
    try:
        sk.flash_attn_varlen_func(x, x, x, _cu([4]), _cu([4]), 4, 4)
    except RuntimeError as err:
        errors["SPELL_KERNELS=triton"] = str(err)
    del os.environ["SPELL_KERNELS"]
    try:
        flash_attn._attn_fwd[(1,)]()
    except RuntimeError as err:
        errors["kernel launch"] = str(err)
    return errors


def test_every_op_runs_without_triton(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SPELL_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result_path = tmp_path / "results.pt"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(result_path), str(torch.get_num_threads())], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = torch.load(result_path, weights_only=False)

    assert not child.pop("triton_imported")
    refusals = child.pop("refusals")
    assert set(refusals) == {"SPELL_KERNELS=triton", "kernel launch"}, refusals
    for where, message in refusals.items():
        assert "`triton` package is not installed" in message and "pip install triton" in message, where
    assert "_attn_fwd" in refusals["kernel launch"]

    expected = every_op()  # this process: Triton installed, the same PyTorch paths
    assert child.keys() == expected.keys()
    assert child.pop("integration_registered") == expected.pop("integration_registered")
    for name in expected:
        torch.testing.assert_close(child[name], expected[name], rtol=0, atol=0, msg=name)

    from spell_kernels import reference

    q, k, v = (t.double() for t in child["attn_inputs"])
    out64, _ = reference.attention_varlen_forward(q, k, v, _cu([5, 3]), _cu([5, 3]), None, True)
    torch.testing.assert_close(child["flash_attn_varlen_func"][0].double(), out64, rtol=1e-5, atol=1e-6)
