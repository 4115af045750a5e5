"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM (the oracle), fp32: logits and gradients
with transformers' routing replayed (near-ties cannot flip the comparison), routing record and
replay, expert load counts, the load-balancing loss, both checkpoint layouts, and bad configs."""
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from spell_core.models.model import ModelConfig, load_pretrained, save_pretrained
from spell_core.models.routing import Routing
from tests.core.test_checkpoint import tiny_tokenizer
from tests.core.tiny_models import ours_from_hf, perturbed_hf_model, tiny_moe_config

VOCAB = 64
TOL = 1e-4  # float32, max abs difference
LENGTHS = [7, 1, 12]
# name -> config overrides; 4 layers, one dense by mlp_only_layers (or every other by decoder_sparse_step)
CASES = {
    "k2_norm": dict(num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    "k3_no_norm": dict(num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[2]),
    "k2_sparse_step2_tied": dict(num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[],
                                 decoder_sparse_step=2, tie_word_embeddings=True),
}


def make_hf(name, seed=0):
    return perturbed_hf_model(tiny_moe_config(VOCAB, num_hidden_layers=4, **CASES[name]), seed).eval()


def seqs_and_packed(seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENGTHS).cumsum(0)
    return seqs, torch.cat(seqs), cu


class RouterTap:
    """Hooks every transformers router: records its (router_logits, top-k ids) per layer and call,
    or, given `forced` ids (layer -> list of (T, k) per call), makes it route there with the
    weights the routing contract defines (softmax over all experts gathered, renormalised)."""

    def __init__(self, hf, forced=None):
        self.logits, self.ids, self.forced, self.handles = {}, {}, forced, []
        for i, layer in enumerate(hf.model.layers):
            if hasattr(layer.mlp, "gate"):
                self.handles.append(layer.mlp.gate.register_forward_hook(self._hook(i, layer.mlp.gate)))

    def _hook(self, layer_idx, router):
        def hook(module, args, output):
            logits, weights, ids = output
            if self.forced is not None:
                ids = self.forced[layer_idx][len(self.ids.get(layer_idx, []))]
                probs = torch.softmax(logits.double(), dim=-1).float()
                weights = probs.gather(1, ids)
                if router.norm_topk_prob:
                    weights = weights / weights.sum(-1, keepdim=True)
            self.logits.setdefault(layer_idx, []).append(logits.detach())
            self.ids.setdefault(layer_idx, []).append(ids.detach())
            return logits, weights, ids
        return hook

    def packed_ids(self):
        return {i: torch.cat(calls) for i, calls in self.ids.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


def hf_per_sequence(hf, seqs, forced=None):
    """transformers' logits of each sequence alone, concatenated, and its routing taps."""
    tap = RouterTap(hf, forced)
    try:
        logits = torch.cat([hf(s[None]).logits[0] for s in seqs])
    finally:
        tap.remove()
    return logits, tap


def assert_grads_match(ours, hf):
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    checked = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name]
        assert p.grad is not None and ref is not None, name
        scale = max(ref.abs().max().item(), 1e-3)
        assert (p.grad - ref).abs().max().item() <= 1e-4 * scale, name
        checked += 1
    assert checked == len(hf_grads)  # named_parameters lists a tied head once on both sides


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_gradients_match_transformers_with_its_routing_replayed(name):
    hf = make_hf(name)
    ours = ours_from_hf(hf)
    seqs, ids, cu = seqs_and_packed()
    weights = torch.randn(len(ids), VOCAB, generator=torch.Generator().manual_seed(5))
    hf_logits, tap = hf_per_sequence(hf, seqs)
    routing = Routing("replay", tap.packed_ids())
    assert sorted(routing.experts) == [i for i in range(4) if ours.config.is_moe_layer(i)]
    logits = ours(ids, cu, routing=routing)
    assert (logits - hf_logits).abs().max().item() <= TOL
    (logits * weights).sum().backward()
    (hf_logits * weights).sum().backward()
    assert_grads_match(ours, hf)


def test_replayed_ids_that_are_not_the_top_k_route_there():
    hf = make_hf("k3_no_norm")
    ours = ours_from_hf(hf)
    seqs, ids, cu = seqs_and_packed()
    _, tap = hf_per_sequence(hf, seqs)
    # the experts just after the chosen ones: never the router's top-k, some repeated across slots
    forced = {i: [(calls + 1) % 8 for calls in tap.ids[i]] for i in tap.ids}
    forced_logits, _ = hf_per_sequence(hf, seqs, forced)
    routing = Routing("replay", {i: torch.cat(c).to(torch.uint8) for i, c in forced.items()})
    with torch.no_grad():
        logits = ours(ids, cu, routing=routing)
        natural = ours(ids, cu)
    assert (logits - forced_logits).abs().max().item() <= TOL
    assert (natural - forced_logits).abs().max().item() > 1e-2  # the replay changed the routing


def tie_margin(logits, k):
    """Per token: the gap between the k-th and (k+1)-th router probability."""
    top = torch.softmax(logits.double(), dim=-1).topk(k + 1, dim=-1).values
    return (top[:, :-1] - top[:, 1:]).min(dim=-1).values


@pytest.mark.parametrize("name", ["k2_norm", "k3_no_norm"])
def test_record_returns_transformers_top_k_where_there_is_no_near_tie(name):
    hf = make_hf(name)
    ours = ours_from_hf(hf)
    k = hf.config.num_experts_per_tok
    seqs, ids, cu = seqs_and_packed()
    _, tap = hf_per_sequence(hf, seqs)
    routing = Routing("record")
    with torch.no_grad():
        ours(ids, cu, routing=routing)
    assert sorted(routing.experts) == sorted(tap.ids)
    compared = 0
    for i, recorded in routing.experts.items():
        assert recorded.dtype == torch.uint8 and recorded.shape == (len(ids), k)
        clear = tie_margin(torch.cat(tap.logits[i]), k) > 1e-5
        assert torch.equal(recorded[clear].long(), tap.packed_ids()[i][clear])
        compared += int(clear.sum())
    assert compared >= len(ids)  # most tokens have no near-tie


def test_replaying_a_recording_reproduces_the_forward_and_recording_is_kept_through_checkpointing():
    """Gradient checkpointing: the same log-probs, recording, gradients (aux loss included), one count."""
    hf = make_hf("k2_norm")
    ours = ours_from_hf(hf)
    _, ids, cu = seqs_and_packed()
    ours.router_aux_loss_coef = 0.01  # its sums leave the checkpointed layers: their gradient must still arrive
    recorded = Routing("record")
    plain = ours.token_logprobs(ids, cu, routing=recorded)
    (plain.sum() + ours.router_aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.gradient_checkpointing = True
    ours.read_expert_load()
    again = Routing("record")
    checkpointed = ours.token_logprobs(ids, cu, routing=again)
    (checkpointed.sum() + ours.router_aux_loss).backward()
    assert torch.equal(checkpointed, plain)
    assert all(torch.equal(again.experts[i], recorded.experts[i]) for i in recorded.experts)
    for n, p in ours.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-5), n
    # the recomputation in backward is not counted: one forward's tokens per layer
    load = ours.read_expert_load()
    assert all(int(v.sum()) == len(ids) * 2 for v in load.values())
    with torch.no_grad():
        replayed = ours.token_logprobs(ids, cu, routing=Routing("replay", recorded.experts))
    assert torch.equal(replayed, plain.detach())


def test_expert_load_counts_each_layers_choices_and_resets_on_read():
    hf = make_hf("k3_no_norm")
    ours = ours_from_hf(hf)
    _, ids, cu = seqs_and_packed()
    routing = Routing("record")
    with torch.no_grad():
        ours(ids, cu, routing=routing)
        ours(ids[:5])
    load = ours.read_expert_load()
    assert sorted(load) == sorted(routing.experts) == [0, 1, 3]
    first_five = Routing("record")
    with torch.no_grad():
        ours(ids[:5], routing=first_five)
    for i, counts in load.items():
        expected = torch.bincount(routing.experts[i].long().flatten(), minlength=8)
        expected += torch.bincount(first_five.experts[i].long().flatten(), minlength=8)
        assert counts.dtype == torch.long and torch.equal(counts, expected)
    ours.read_expert_load()
    assert all(int(v.sum()) == 0 for v in ours.read_expert_load().values())


def test_router_aux_loss_is_off_by_default_and_matches_transformers_when_asked():
    hf = make_hf("k2_norm")
    ours = ours_from_hf(hf)
    ids = seqs_and_packed()[0][2]
    ours(ids)
    assert ours.router_aux_loss is None
    ours.router_aux_loss_coef = 0.01
    ours(ids)
    out = hf(ids[None], output_router_logits=True)
    assert abs(ours.router_aux_loss.item() - 0.01 * out.aux_loss.item()) <= 1e-7
    ours.router_aux_loss.backward()
    (0.01 * out.aux_loss).backward()
    for i in (0, 2, 3):
        name = f"model.layers.{i}.mlp.gate.weight"
        ref = hf.get_parameter(name).grad
        assert ref.abs().max() > 0
        assert torch.allclose(ours.get_parameter(name).grad, ref, atol=1e-8, rtol=1e-4), name


def hf_folder(tmp_path, name="k2_norm"):
    hf = make_hf(name)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return hf, folder


def assert_same_logits(model, hf):
    ids = seqs_and_packed()[0][2]
    with torch.no_grad():
        assert (model(ids) - hf(ids[None]).logits[0]).abs().max().item() <= TOL


def test_loads_the_hubs_per_expert_layout(tmp_path):
    hf, folder = hf_folder(tmp_path)
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names  # what transformers 5.25 writes
    model, _ = load_pretrained(folder)
    assert_same_logits(model, hf)


def test_loads_transformers_fused_layout(tmp_path):
    hf, folder = hf_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_pretrained(folder)
    assert_same_logits(model, hf)


def test_save_then_transformers_loads_the_same_model(tmp_path):
    hf, folder = hf_folder(tmp_path, "k3_no_norm")
    model, tokenizer = load_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = save_pretrained(model, tokenizer, tmp_path / "ours", max_shard_bytes=30_000)
    index = json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in index
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    assert isinstance(reloaded, transformers.Qwen3MoeForCausalLM)
    assert_same_logits(model, reloaded)
    ours_again, _ = load_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(ours_again.state_dict().values(), model.state_dict().values()))


def moe_raw(**changes):
    raw = json.loads(tiny_moe_config(VOCAB, num_hidden_layers=4).to_json_string())
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be at most num_experts \(8\)"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok must be an integer >= 1"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step must be an integer >= 1"),
    (dict(moe_intermediate_size=-1), "moe_intermediate_size must be an integer >= 1"),
    (dict(mlp_only_layers=[1, 4]), r"mlp_only_layers \[4\] are outside 0..3"),
    (dict(mlp_only_layers="1"), "mlp_only_layers must be a list of layer indices"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    (dict(num_experts=16), r"num_experts \(16\) and num_local_experts \(8\) disagree"),
    (dict(use_sliding_window=True), "sliding-window attention layers are not supported"),
    (dict(architectures=["Qwen3MoeForSequenceClassification"]), "architecture 'Qwen3MoeForSequenceClassification'"),
])
def test_bad_moe_config_fields_name_the_file_and_field(changes, message):
    with pytest.raises(ValueError, match=r"cfg/config\.json: .*" + message):
        ModelConfig.from_hf(moe_raw(**changes), source="cfg/config.json")


def test_hub_config_names_num_experts():
    raw = moe_raw()
    raw["num_experts"] = raw.pop("num_local_experts")
    config = ModelConfig.from_hf(raw)
    assert (config.num_experts, config.num_experts_per_tok, config.mlp_only_layers) == (8, 2, (1,))
    assert [config.is_moe_layer(i) for i in range(4)] == [True, False, True, True]


def test_replay_without_a_layers_ids_or_with_the_wrong_shape_says_so():
    ours = ours_from_hf(make_hf("k2_norm"))
    ids = torch.arange(5)
    with pytest.raises(ValueError, match="no expert ids for MoE layer 0"):
        ours(ids, routing=Routing("replay"))
    bad = {i: torch.zeros(4, 2, dtype=torch.uint8) for i in (0, 2, 3)}
    with pytest.raises(ValueError, match=r"layer 0 has expert ids of shape \(4, 2\), expected \(5, 2\)"):
        ours(ids, routing=Routing("replay", bad))


def test_train_state_checkpoint_round_trip(tmp_path):
    from spell_core.training import train_state

    model = ours_from_hf(make_hf("k2_norm"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.token_logprobs(seqs_and_packed()[1]).sum().backward()
    optimizer.step()
    folder = train_state.save(tmp_path, 3, model, tiny_tokenizer(), optimizer)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "model.layers.2.mlp.experts.5.up_proj.weight" in set(f.keys())
    fresh = ours_from_hf(make_hf("k2_norm", seed=1))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert train_state.load(tmp_path, fresh, fresh_optimizer)[0] == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    saved_avg = optimizer.state_dict()["state"][5]["exp_avg"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][5]["exp_avg"], saved_avg)
