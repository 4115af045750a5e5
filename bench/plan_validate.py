"""The memory planner (spell_core/plan.py) against measured peaks on CPU.

Each case runs in a fresh process with glibc told to return freed blocks (memory.MALLOC_ENV):
a random model in fp32 or bf16 (all weights and activations in that dtype, as on a GPU; bf16
matmuls are slow on CPU, so few of those), two warm-up steps on a short trajectory (the libraries' lazy buffers,
AdamW's state and the update guard's copies then exist, as in a run), then two measured train
steps: the rise of the resident set's peak (VmHWM) during the first, and the exact peak of live
tensor bytes (torch.profiler's memory events) during the second. The prediction is the largest
of the planner's `activations()` over the step's micro-batches (the second and later ones find
the first one's gradients in place). Prints a markdown table; an error is
(predicted - measured) / measured.

    python bench/plan_validate.py            # the table of bench/results/plan.md
    python bench/plan_validate.py --case '{"model": "qwen3 2 x 384", ...}'   # one case
    python bench/plan_validate.py --moe      # only the MoE FFN's table (issue 22)

The MoE terms (no MoE model on CPU yet: the FFN alone, a Qwen3-MoE router and
spell_kernels.moe_experts): the bytes autograd keeps through the forward (the live tensor bytes
left after it, less its output, from torch.profiler's memory events; and the storages its saved
tensors hold, from saved_tensors_hooks) and the weight gradients after backward, against
`Shape.moe_saved_bytes_per_token(device="cpu")` and the layer's expert + router parameters.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "llama 4 x 256": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, vocab_size=4096),
    "qwen3 2 x 384": dict(model_type="qwen3", hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=64, vocab_size=8192),
    "qwen2 2 x 256 tied": dict(model_type="qwen2", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                               tie_word_embeddings=True),
}
DESCRIPTIONS = {
    "llama 4 x 256": "llama 4 x 256 (8 q / 2 kv heads x 32, I 768, V 4096)",
    "qwen3 2 x 384": "qwen3 2 x 384 (6 q / 2 kv heads x 64, q/k norm, I 1024, V 8192)",
    "qwen2 2 x 256 tied": "qwen2 2 x 256 tied (4 q / 2 kv heads x 64, q/k/v bias, I 1024, V 8192, tied head)",
}
# (sequence length, sequences per step, micro-batch tokens, gradient checkpointing, weights' dtype)
SHAPES = {"llama 4 x 256": [(2048, 2, 4096, False, "float32"), (4096, 1, 4096, False, "float32"),
                            (4096, 2, 4096, False, "float32"), (4096, 1, 4096, True, "float32"),
                            (8192, 1, 8192, True, "float32")],
          "qwen3 2 x 384": [(2048, 1, 2048, False, "float32"), (4096, 1, 4096, False, "float32"),
                            (4096, 2, 4096, False, "float32"), (4096, 2, 8192, False, "float32"),
                            (8192, 1, 8192, True, "float32"), (2048, 1, 2048, False, "bfloat16"),
                            (8192, 1, 8192, False, "bfloat16"), (4096, 1, 4096, True, "bfloat16")],
          "qwen2 2 x 256 tied": [(4096, 1, 4096, False, "float32"), (4096, 2, 4096, False, "float32"),
                                 (8192, 1, 8192, True, "float32")]}
RESPONSE = 256


def raw_config(name):
    return dict(dict(architectures=[], max_position_embeddings=65536, rope_theta=10000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False), **MODELS[name])


def run_case(case):
    import torch

    from memory import live_tensor_peak, time_and_peak
    from spell_core.selfplay.batch import Trajectory
    from spell_core.models.model import CausalLM, ModelConfig
    from spell_core.training.trainer import Trainer, TrainerOptions, plan_micro_batches

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(raw_config(case["model"]))).to(getattr(torch, case["dtype"]))
    trainer = Trainer(model, TrainerOptions(lr=1e-5, micro_batch_tokens=case["mb"],
                                            gradient_checkpointing=case["gc"], bf16_autocast=False))
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    trajectories = []
    for i in range(case["sequences"]):
        prompt = torch.randint(0, vocab, (case["length"] - RESPONSE,), generator=g).tolist()
        response = torch.randint(0, vocab, (RESPONSE,), generator=g).tolist()
        trajectories.append(Trajectory("responder", prompt, response, [-8.0] * RESPONSE, 1.0, group=f"g{i}"))
    # two warm-up steps on one short trajectory: the libraries' lazy buffers, AdamW's state and the
    # update guard's copies of it exist from here on, as in a run
    short = Trajectory("responder", trajectories[0].prompt_ids[:64], trajectories[0].response_ids[:8], [-8.0] * 8, 1.0)
    for _ in range(2):
        trainer.train_step([short])
    micro_batches = [(mb.layout.num_tokens, int(mb.targets.numel()))
                     for mb in plan_micro_batches(trajectories, case["mb"])]
    rss = time_and_peak(lambda: trainer.train_step(trajectories))
    live = live_tensor_peak(lambda: trainer.train_step(trajectories))
    return {"rss_peak_bytes": rss["peak_extra_bytes"], **live, "micro_batches": micro_batches}


def predicted(shape, micro_batches, gc):
    """The planner's peak over the step's micro-batches, and the moment it names."""
    from spell_core.plan import activation_peaks

    best = (0, "")
    for index, (tokens, rows) in enumerate(micro_batches):
        peaks = activation_peaks(shape, tokens, gc, device="cpu", loss_rows=rows, full_gradients=True,
                                 gradients_held=index > 0)
        where = max(peaks, key=peaks.get)
        best = max(best, (peaks[where], where + (f", micro-batch {index + 1}" if len(micro_batches) > 1 else "")))
    return best


# MoE FFN cases: (tokens, hidden, moe intermediate, experts, experts per token, dtype)
MOE_CASES = [(2048, 256, 128, 16, 2, "float32"), (4096, 256, 128, 16, 4, "float32"),
             (4096, 128, 64, 64, 8, "float32"), (2048, 256, 128, 16, 2, "bfloat16"),
             (4096, 128, 64, 64, 8, "bfloat16"), (1024, 64, 32, 128, 8, "float32")]


def moe_ffn(x, router, gate_up, down, k):
    """Qwen3-MoE's sparse block as transformers computes it: linear router, fp32 softmax over all
    experts, top-k, renormalised (norm_topk_prob), cast back; the experts by spell_kernels."""
    import torch
    import torch.nn.functional as F
    from spell_kernels.moe import moe_experts

    probs = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return moe_experts(x, gate_up, down, ids, weights.to(x.dtype))


def _live_bytes_left(prof) -> int:
    """The allocator's running total after the profiled block less before it (memory events)."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    return events[-1][1] - (events[0][1] - events[0][2])


def saved_storage_bytes(forward, inputs):
    """(output, bytes): run `forward()` and count every distinct storage its saved tensors hold
    for backward (saved_tensors_hooks), the `inputs` (the input and the weights) left out."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in inputs}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(kept.values())


def moe_shape(hidden, inter, experts, k, dtype: str):
    """The planner's shape of one MoE layer (the other fields are unused by its MoE terms)."""
    from spell_core.plan import Shape

    return Shape(vocab=1, hidden=hidden, intermediate=0, layers=1, heads=1, kv_heads=1, head_dim=1, tied=False,
                 qk_norm=False, qkv_bias=False, max_positions=1, dtype=dtype, experts=experts,
                 experts_per_token=k, moe_intermediate=inter, moe_layers=(0,))


def run_moe_case(tokens, hidden, inter, experts, k, dtype):
    """Measured: live bytes left by the forward less its output (profiler), the storages of the
    saved tensors (hooks), the weight gradients' bytes after backward; and the planner's terms."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    x = torch.randn(tokens, hidden, dtype=dt, requires_grad=True)
    weights = [(torch.randn(*shape, dtype=dt) / hidden**0.5).requires_grad_()
               for shape in ((experts, hidden), (experts, 2 * inter, hidden), (experts, hidden, inter))]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, kept = saved_storage_bytes(lambda: moe_ffn(x, *weights, k), [x, *weights])
    left = _live_bytes_left(prof) - out.untyped_storage().nbytes()
    out.float().square().sum().backward()
    shape = moe_shape(hidden, inter, experts, k, dtype)
    return {"kept_live": left, "kept_saved": kept, "kept_planned": shape.moe_saved_bytes_per_token("cpu")
            * tokens, "grads": sum(w.grad.untyped_storage().nbytes() for w in weights),
            "grads_planned": (shape.layer_params(moe=True) - shape.attention_params()) * shape.bytes}


def moe_table():
    print("| tokens | H | Im | E | k | dtype | kept (live after forward) MiB | kept (saved storages) MiB | "
          "planned MiB | error | weight gradients MiB | planned MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for case in MOE_CASES:
        got = run_moe_case(*case)
        errors = [(got["kept_planned"] - got["kept_live"]) / got["kept_live"],
                  (got["grads_planned"] - got["grads"]) / got["grads"]]
        worst = max([worst] + [abs(e) for e in errors])
        mib = {k: v / 2**20 for k, v in got.items()}
        print("| " + " | ".join(map(str, case)) + f" | {mib['kept_live']:.3f} | {mib['kept_saved']:.3f} | "
              f"{mib['kept_planned']:.3f} | {errors[0]:+.2%} | {mib['grads']:.3f} | {mib['grads_planned']:.3f} | "
              f"{errors[1]:+.2%} |", flush=True)
    print(f"\nlargest error (MoE FFN): {worst:.2%}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case")
    p.add_argument("--moe", action="store_true", help="only the MoE FFN's table")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.moe:
        moe_table()
        return
    from memory import MALLOC_ENV, run_json
    from spell_core.plan import Shape

    print("| model | weights | sequence | sequences | micro-batches x tokens | checkpointing | "
          "predicted MiB (moment) | live tensors MiB | error | resident MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name in MODELS:
        for length, sequences, mb, gc, dtype in SHAPES[name]:
            shape = Shape.from_config(raw_config(name), dtype)
            case = dict(model=name, length=length, sequences=sequences, mb=mb, gc=gc, dtype=dtype)
            got = run_json([os.path.abspath(__file__), "--case", json.dumps(case)], env=MALLOC_ENV)
            short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
            cells = f"| {DESCRIPTIONS[name]} | {short} | {length} | {sequences} | "
            if "error" in got:
                print(cells + f"{mb} | {gc} | error: {got['error']} | | | | |", flush=True)
                continue
            tokens = [t for t, _ in got["micro_batches"]]
            value, where = predicted(shape, got["micro_batches"], gc)
            errors = [(value - got[k]) / got[k] for k in ("live_peak_bytes", "rss_peak_bytes")]
            worst = max([worst] + [abs(e) for e in errors])
            layout = f"{len(tokens)} x {max(tokens)}"
            print(cells + f"{layout} | {'yes' if gc else 'no'} | {value / 2**20:.1f} ({where}) | "
                  f"{got['live_peak_bytes'] / 2**20:.1f} | {errors[0]:+.1%} | {got['rss_peak_bytes'] / 2**20:.1f} | "
                  f"{errors[1]:+.1%} |", flush=True)
    print(f"\nlargest error: {worst:.1%}\n")
    moe_table()


if __name__ == "__main__":
    main()
