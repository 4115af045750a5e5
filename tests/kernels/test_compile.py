"""spell_kernels' ops under torch.compile(fullgraph=True): they are torch.library custom ops with
fake implementations, so a small model calling flash_attn_varlen_func, fused_linear_logprob and
policy_loss traces into one graph (fullgraph=True raises on any graph break). Backend "aot_eager"
(AOT autograd, which runs the fake implementations and traces the backward, without inductor's
code generation, too slow on this 2-core CI); the compiled model must equal eager, values and
gradients."""
import pytest
import torch

import spell_kernels as sk
import spell_kernels.flash_attn  # noqa: F401  (importing a module registers its ops)
import spell_kernels.logprob  # noqa: F401
import spell_kernels.policy_loss  # noqa: F401


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=41, dim=16, heads=4, kv_heads=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) / 4)
        self.q = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / 4)
        self.kv = torch.nn.Parameter(torch.randn(2 * kv_heads * self.head_dim, dim, generator=g) / 4)
        self.head = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) / 4)

    def forward(self, ids, cu_seqlens, max_seqlen: int, targets, advantages, mask, old):
        x = self.embed[ids]
        q = (x @ self.q.T).view(-1, self.heads, self.head_dim)
        k, v = (x @ self.kv.T).view(-1, 2, self.kv_heads, self.head_dim).unbind(1)
        h = x + sk.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, None, True
                                          ).reshape(x.shape)
        logp, entropy = sk.fused_linear_logprob(h, self.head, targets, 0.9, True, softcap=5.0)
        loss, stats = sk.policy_loss(h, self.head, targets, old, advantages, mask, agg="seq-mean-token-mean",
                                     cu_seqlens=cu_seqlens, temperature=0.9, softcap=5.0)
        return loss + 0.01 * entropy.mean(), logp, stats["clip_frac_high"]


def _inputs():
    g = torch.Generator().manual_seed(1)
    n = 11
    return dict(ids=torch.randint(0, 41, (n,), generator=g),
                cu_seqlens=torch.tensor([0, 4, 11], dtype=torch.int32), max_seqlen=7,
                targets=torch.randint(0, 41, (n,), generator=g),
                advantages=torch.randn(n, generator=g),
                mask=torch.rand(n, generator=g) > 0.2,
                old=-3.5 + torch.randn(n, generator=g))


def _run(model, fn, inputs):
    model.zero_grad(set_to_none=True)
    loss, logp, clip = fn(**inputs)
    loss.backward()
    return [loss.detach(), logp.detach(), clip] + [p.grad.clone() for p in model.parameters()]


def test_small_model_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    model = TinyLM()
    inputs = _inputs()
    eager = _run(model, model, inputs)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=counting_backend)
    got = _run(model, compiled, inputs)
    assert len(graphs) == 1  # one graph: no break
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("spell_kernels.flash_attn_varlen.default", "spell_kernels.linear_logprob.default",
               "spell_kernels.policy_loss.default"):
        assert op in ops, (op, sorted(ops))
    for a, e in zip(got, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def _op_samples():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(7, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(7, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(7, 2, 8, generator=g, requires_grad=True)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    h = torch.randn(7, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (7,), generator=g)
    ones = torch.ones(7)
    return [
        (torch.ops.spell_kernels.flash_attn_varlen, (q, k, v, cu, cu, 4, 4, None, True, None, True)),
        (torch.ops.spell_kernels.linear_logprob, (h, w, t, 0.8, True, -100, 1.0, 3.0)),
        (torch.ops.spell_kernels.policy_loss, (h, w, t, ones * -2.0, torch.randn(7, generator=g), ones / 7, None,
                                               None, ones.bool(), None, 0, 0.2, 0.28, None, 0.0, "k3", 0.0, 1.0,
                                               1.0, None, False, -100, True, True)),
    ]


@pytest.mark.parametrize("index", range(3), ids=["flash_attn_varlen", "linear_logprob", "policy_loss"])
def test_ops_pass_torch_library_opcheck(index):
    """torch.library.opcheck: schema, fake implementation (shapes/dtypes as the real op), and the
    autograd registration as AOT autograd sees it."""
    op, args = _op_samples()[index]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if index == 2:  # its gradients are outputs formed in the forward pass: autograd is checked end to end above
        utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(op, args, test_utils=utils)


def test_validation_that_would_sync_runs_only_when_asked():
    """On CPU tensors the content checks run by default; check=False skips them (the GPU default,
    where they would sync the host), check=True forces them."""
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    bad = torch.tensor([0, 1, 9])
    with pytest.raises(ValueError, match="target ids"):
        sk.fused_linear_logprob(h, w, bad)
    with pytest.raises(ValueError, match="target ids"):
        sk.fused_linear_logprob(h, w, bad, check=True)
    from spell_kernels.logprob import should_check
    assert should_check(None, h) and not should_check(False, h) and should_check(True, h)
    meta = torch.empty(3, device="meta")
    assert not should_check(None, meta)  # not a CPU tensor: no check unless check=True


def test_importing_the_policy_loss_module_keeps_the_function():
    """`policy_loss` is a submodule and a function: importing the submodule (as this file and
    spell_kernels.modules do) must not replace spell_kernels.policy_loss with the module."""
    import spell_kernels.modules  # noqa: F401  (imports .policy_loss)
    assert callable(sk.policy_loss) and sk.policy_loss.__name__ == "policy_loss"
    from spell_kernels import policy_loss
    assert callable(policy_loss)
