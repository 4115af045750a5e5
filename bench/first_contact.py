"""The stages of bench/gpu_first_contact.sh, one per process: `python3 bench/first_contact.py STAGE`.

Each stage prints its log and, for the summary, lines `KEY name: value` (the shell script
copies them into $OUT/summary.md); it exits non-zero when a check fails. DRY_RUN=1 runs every
stage on CPU at tiny shapes (the Triton interpreter): tests/core/test_gpu_first_contact.py.

  env        versions, the device, that spell_kernels and spell_core import from the tree
  kernels    every kernel against PyTorch on the device in bf16 / fp16 / fp32 (bench/gpu_attention.py's
             attention cases; decode + combine at the kernel's own split count; LSE merge; fused
             log-prob; policy loss), and our decoder against transformers on the same weights
  run        one `spell_core.run` step on the device (CUDA-graph decoder on by default), SmolLM2-135M's
             shape with random bf16 weights and its tokenizer (carried in bench/first_contact/);
             checks the metrics line, the GPU telemetry keys, the checkpoint and how many weights moved
  attention  attention TFLOP/s vs SDPA and a measured bf16 matmul peak at 4k-64k (bench/gpu_attention.py)
  logprob    fused log-prob vs naive, peak memory and time at 32k x 4096 x 128k (bench/test_bench_logprob.py)
  sampler    our sampler's tokens/s, eager and CUDA graph, vs transformers generate on the same weights
  moe        the MoE grouped GEMM (spell_kernels.moe_experts) against a loop over experts on the device:
             bf16 forward + all four gradients vs float64, empty experts' exact zero gradients, bitwise
             reruns, a CUDA-graph capture of the forward; then TFLOP/s of both, forward and forward +
             backward, at a Qwen3-30B-A3B layer (H 2048, I 768, E 128, k 8), T 4096 and 16384
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE_NAMES = ("env", "kernels", "run", "attention", "logprob", "sampler", "moe")
if __name__ == "__main__" and (len(sys.argv) != 2 or sys.argv[1] not in STAGE_NAMES):  # before the slow imports
    raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(STAGE_NAMES)}}}")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRY = os.environ.get("DRY_RUN") == "1"
DEV = "cpu" if DRY else "cuda"
TOKENIZER = ROOT / "bench" / "first_contact" / "smollm2_tokenizer"
SMOLLM2 = dict(  # config.json of SmolLM2-135M-Instruct: the run's and the sampler's model shape
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    pad_token_id=2, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, initializer_range=0.02)
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


def key(name: str, value) -> None:
    print(f"KEY {name}: {value}", flush=True)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


class Checks:
    """Run named checks, report each, go on after a failure; fail the stage at the end."""

    def __init__(self):
        self.failed: list[str] = []
        self.passed = 0

    def run(self, name, fn):
        try:
            detail = fn()
            self.passed += 1
            print(f"- PASS {name}{': ' + detail if detail else ''}", flush=True)
        except Exception as err:  # report and continue: one run should show every problem
            self.failed.append(name)
            print(f"- FAIL {name}: {type(err).__name__}: {str(err)[:400]}", flush=True)

    def finish(self) -> int:
        key("checks", f"{self.passed} passed, {len(self.failed)} failed" + (f" ({'; '.join(self.failed)})"
                                                                             if self.failed else ""))
        return 1 if self.failed else 0


# --- (a) environment -------------------------------------------------------------------------------

def stage_env() -> int:
    import triton
    import transformers

    import spell_core
    import spell_kernels
    key("python", sys.version.split()[0])
    key("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")
    key("triton", triton.__version__)
    key("transformers", transformers.__version__)
    for module in (spell_kernels, spell_core):
        where = Path(module.__file__).resolve()
        if ROOT not in where.parents:
            raise SystemExit(f"{module.__name__} imports from {where}, not from this tree ({ROOT}): check PYTHONPATH")
    key("spell_kernels", Path(spell_kernels.__file__).parent)
    if DEV == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("torch.cuda.is_available() is False")
        p = torch.cuda.get_device_properties(0)
        key("device", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                      f"sm_{p.major}{p.minor}")
        try:
            import pynvml  # noqa: F401
            key("pynvml", "importable")
        except ImportError as err:
            key("pynvml", f"missing ({err}): the run's GPU telemetry will be empty")
    else:
        key("device", "CPU (dry run)")
    return 0


# --- (b) kernel correctness --------------------------------------------------------------------------

def _rel_err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def _decode_check(dtype):
    import torch.nn.functional as F

    from spell_kernels import decode_attn_shared_prefix
    groups, samples, own, (hq, hkv, d) = (1, 2, 5, (4, 2, 16)) if DRY else (2, 8, 64, (9, 3, 64))
    prefix = 70 if DRY else 32768  # long: the kernel splits the prefix over about 2 x SMs programs
    gen = torch.Generator(device=DEV).manual_seed(0)
    i32 = dict(dtype=torch.int32, device=DEV)
    b = groups * samples
    slots = groups * prefix + b * own
    k = torch.randn(slots, hkv, d, device=DEV, generator=gen).to(dtype)
    v = torch.randn(slots, hkv, d, device=DEV, generator=gen).to(dtype)
    q = torch.randn(b, hq, d, device=DEV, generator=gen).to(dtype)
    args = (q, k, v, torch.arange(groups, **i32) * prefix, torch.full((groups,), prefix, **i32),
            torch.arange(groups + 1, **i32) * samples, groups * prefix + torch.arange(b, **i32) * own,
            torch.full((b,), own, **i32))
    got = decode_attn_shared_prefix(*args, max_group_queries=samples, max_prefix_len=prefix, max_own_len=own)
    worst = 0.0
    for s in range(b):
        g = s // samples
        rows = torch.cat([torch.arange(g * prefix, (g + 1) * prefix), groups * prefix + s * own + torch.arange(own)])
        kk, vv = (t[rows.to(DEV)].double().transpose(0, 1) for t in (k, v))  # (hkv, L, d)
        want = F.scaled_dot_product_attention(q[s].double()[:, None], kk, vv, enable_gqa=True)[:, 0]
        worst = max(worst, _rel_err(got[s], want))
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    assert worst <= tol, f"max relative error {worst:.2e} > {tol}"
    return f"prefix {prefix}, max relative error {worst:.1e}"


def _merge_check(dtype):
    from spell_kernels import merge_attn_states
    t, h, d = (7, 3, 16) if DRY else (4096, 16, 128)
    gen = torch.Generator(device=DEV).manual_seed(1)
    out_a, out_b = (torch.randn(t, h, d, device=DEV, generator=gen).to(dtype) for _ in range(2))
    lse_a, lse_b = (5 * torch.randn(h, t, device=DEV, generator=gen) for _ in range(2))
    lse_b[0, 0] = float("-inf")  # a side without keys contributes nothing
    out, lse = merge_attn_states(out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.double().T[..., None], lse_b.double().T[..., None]
    want_lse = torch.logaddexp(la, lb)
    want = out_a.double() * (la - want_lse).exp() + out_b.double() * (lb - want_lse).exp()
    err = float((out.double() - want).abs().max())
    lse_err = float((lse.double() - want_lse[..., 0].T).abs().max())
    assert err <= 1e-5 + 4 * torch.finfo(dtype).eps and lse_err <= 1e-4, f"out {err:.2e}, lse {lse_err:.2e}"
    return f"out error {err:.1e}, lse error {lse_err:.1e}"


def _logprob_check(dtype):
    import spell_kernels as sk
    from spell_kernels import reference
    n, h, v = (33, 32, 1001) if DRY else (300, 4096, 128256)
    gen = torch.Generator(device=DEV).manual_seed(2)
    hidden = torch.randn(n, h, device=DEV, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=DEV, generator=gen) * 3 / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEV, generator=gen)
    targets[::5] = -100
    g = torch.randn(n, device=DEV, generator=gen)

    def grads(fn, hid, w):
        hid, w = hid.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        logp, ent = fn(hid, w)
        ((logp * g.to(logp.dtype)).sum() + (ent * g.to(ent.dtype)).sum()).backward()
        return logp.detach(), ent.detach(), hid.grad, w.grad

    def torch_same_precision(hid, w):  # what PyTorch gets in this dtype: logits in dtype, softmax in fp32
        logp_all = torch.log_softmax((hid @ w.T).float() / 0.7, -1)
        valid = targets != -100
        logp = logp_all.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
        return torch.where(valid, logp, 0.0), torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)

    ours = grads(lambda a, b: sk.fused_linear_logprob(a, b, targets, 0.7, return_entropy=True), hidden, weight)
    exact = grads(lambda a, b: reference.linear_logprob(a, b, targets, 0.7), hidden.double(), weight.double())
    base = grads(torch_same_precision, hidden, weight)
    parts = []
    for name, o, e, b in zip(("logp", "entropy", "d_hidden", "d_weight"), ours, exact, base):
        err, ref_err = float((o.double() - e).abs().max()), float((b.double() - e).abs().max())
        assert err <= 2 * ref_err + 1e-6, f"{name}: error {err:.2e} > 2 x PyTorch's {ref_err:.2e}"
        parts.append(f"{name} {err:.1e} (torch {ref_err:.1e})")
    return f"V={v}: " + ", ".join(parts)


def _policy_loss_check(dtype):
    import spell_kernels as sk
    from spell_kernels import reference
    n, h, v = (40, 32, 1001) if DRY else (2048, 1024, 151936)
    gen = torch.Generator(device=DEV).manual_seed(3)
    hidden = torch.randn(n, h, device=DEV, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=DEV, generator=gen) * 2 / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEV, generator=gen)
    advantages = torch.randn(n, device=DEV, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, device=DEV, generator=gen) < 0.8
    with torch.no_grad():
        logp, _ = reference.linear_logprob(hidden.double(), weight.double(), targets, 0.7)
    old = logp + 0.3 * torch.randn(n, device=DEV, generator=gen, dtype=torch.float64)

    def run(fn, hid, w):
        hid, w = hid.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        loss = fn(hid, w)
        loss.backward()
        return loss.detach(), hid.grad, w.grad

    ours = run(lambda a, b: sk.policy_loss(a, b, targets, old, advantages, mask, clip_low=0.2, clip_high=0.28,
                                           dual_clip=3.0, temperature=0.7)[0], hidden, weight)

    def exact_loss(a, b):
        lp, _ = reference.linear_logprob(a, b, targets, 0.7)
        return reference.ppo_clip_loss(lp, old, advantages, mask, 0.2, 0.28, 3.0)

    exact = run(exact_loss, hidden.double(), weight.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    errs = [_rel_err(o, e) for o, e in zip(ours, exact)]
    assert max(errs) <= tol, f"relative errors loss/d_hidden/d_weight {errs} > {tol}"
    return "relative errors loss {:.1e}, d_hidden {:.1e}, d_weight {:.1e}".format(*errs)


def _decoder_vs_transformers(dtype):
    import transformers

    from tests.core.tiny_models import ours_from_hf
    config = transformers.Qwen2Config(vocab_size=1000, hidden_size=256 if not DRY else 32, intermediate_size=512,
                                      num_hidden_layers=4 if not DRY else 2, num_attention_heads=8 if not DRY else 4,
                                      num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    ours = ours_from_hf(hf)
    hf, ours = hf.to(DEV, dtype), ours.to(DEV, dtype)
    lengths = [300, 77, 1000] if not DRY else [9, 4]
    ids = torch.randint(0, 1000, (sum(lengths),), device=DEV)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    with torch.no_grad():
        got = ours(ids, cu).float()
        want = torch.cat([hf(input_ids=ids[a:b][None]).logits[0].float() for a, b in zip(cu[:-1], cu[1:])])
        exact = torch.cat([hf.double()(input_ids=ids[a:b][None]).logits[0] for a, b in zip(cu[:-1], cu[1:])])
    ours_err, hf_err = float((got.double() - exact).abs().max()), float((want.double() - exact).abs().max())
    assert ours_err <= 3 * hf_err + 1e-5, f"logits error {ours_err:.2e} > 3 x transformers' {hf_err:.2e}"
    return f"logits error {ours_err:.1e} (transformers in {str(dtype)[6:]}: {hf_err:.1e})"


def stage_kernels() -> int:
    os.environ.setdefault("OUT_MD", "")
    sys.path.insert(0, str(ROOT))
    checks = Checks()
    from bench import gpu_attention
    # a dry run checks the script, not the kernels (tests/kernels do): one case of each kind, one dtype
    cases = gpu_attention.CASES if not DRY else [c for c in gpu_attention.CASES if "shared prefix" in c[0]]
    for name, fn in cases:
        checks.run(f"attention: {name}", fn)
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if not DRY else [torch.float32]
    for dtype in dtypes:
        label = str(dtype)[6:]
        checks.run(f"decode + combine, {label}", lambda: _decode_check(dtype))
        checks.run(f"LSE merge, {label}", lambda: _merge_check(dtype))
        checks.run(f"fused log-prob, {label}", lambda: _logprob_check(dtype))
        checks.run(f"policy loss, {label}", lambda: _policy_loss_check(dtype))
        checks.run(f"decoder vs transformers, {label}", lambda: _decoder_vs_transformers(dtype))
    return checks.finish()


# --- (c) one training step end to end ----------------------------------------------------------------

def _model_folder(folder: Path, dtype) -> Path:
    """SmolLM2-135M's shape (tiny on a dry run), random weights, its tokenizer, saved by transformers."""
    import transformers
    config = transformers.LlamaConfig(**{**SMOLLM2, **(TINY if DRY else {})})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


def _scripted_after_real_sampling(record: dict):
    """The real sampler runs (on CUDA with the CUDA graph the loop asks for), then its texts are
    replaced by tests/core/scripted.py's well-formed self-play (random weights write no parsable
    question, and nothing would train), with the model's own log-probs of those texts."""
    from spell_core.sampling import sampler
    from tests.core.scripted import random_play, scripted_generate

    real, script = sampler.generate, scripted_generate(random_play)

    def generate(model, tokenizer, prompts, **kwargs):
        record.setdefault("cuda_graph", []).append(bool(kwargs.get("cuda_graph", False)))
        start = time.perf_counter()
        real(model, tokenizer, prompts, **dict(kwargs, max_new_tokens=2) if DRY else kwargs)
        record["real_sampler_s"] = record.get("real_sampler_s", 0.0) + time.perf_counter() - start
        results = script(model, tokenizer, prompts, **kwargs)
        _own_logprobs(model, prompts, results, kwargs.get("temperature", 1.0))
        return results

    return generate


@torch.no_grad()
def _own_logprobs(model, prompts, results, temperature):
    dev = model.lm_head_weight.device
    for p, out in zip(prompts, results):
        for c in out:
            ids = torch.tensor(list(p) + c.token_ids, device=dev)
            logp = model.token_logprobs(ids, temperature=temperature)
            c.logprobs[:] = logp[len(p):].tolist()


def stage_run() -> int:
    if DRY:  # the script, not the kernels (the kernels stage runs them in the interpreter): PyTorch paths
        os.environ["SPELL_KERNELS"] = "torch"
    from safetensors.torch import load_file

    from spell_core import run
    from spell_core.sampling import sampler
    from tests.core.scripted import make_tiny_corpus

    work = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="first-contact-"))
    folder = _model_folder(work / "model", torch.bfloat16)
    corpus = make_tiny_corpus(work / "corpus")
    out = work / "run"
    record: dict = {}
    sampler.generate = _scripted_after_real_sampling(record)
    argv = ["--model", str(folder), "--corpus", str(corpus), "--out", str(out), "--ctx", "2k", "--device", DEV,
            "--questions", "4", "--group-size", "4", "--max-new-tokens", "64", "--seed", "1",
            "--steps", "1", "--no-progress"]
    print("spell_core.run " + " ".join(argv), flush=True)
    start = time.perf_counter()
    code = run.main(argv)
    key("run", f"exit {code} in {time.perf_counter() - start:.0f} s (real sampler {record.get('real_sampler_s', 0):.1f} s)")
    checks = Checks()

    def metrics_line():
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1, f"{len(lines)} lines in metrics.jsonl"
        m = json.loads(lines[0])
        shown = ("train_loss", "train_grad_norm", "train_tokens_trained", "train_ratio_min", "train_ratio_max",
                 "train_step_time_s")
        missing = [k for k in ("step", "train_skipped", *shown) if k not in m]
        assert not missing and m["train_skipped"] is False and m["train_tokens_trained"] > 0, \
            f"missing {missing}; skipped {m.get('train_skipped')} ({m.get('train_skip_reason')})"
        key("metrics", ", ".join(f"{k[6:]} {m[k]:.4g}" for k in shown))
        # the old log-probs are the model's own (token_logprobs): the trainer's must agree, ratio 1
        assert 0.9 < m["train_ratio_min"] <= m["train_ratio_max"] < 1.1, "sampler and trainer log-probs disagree"
        return None

    def telemetry():
        m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        from spell_core.cli.monitor import GpuTelemetry
        present = [k for k in GpuTelemetry.KEYS if k in m]
        if DRY:
            return "no GPU on a dry run"
        assert present == list(GpuTelemetry.KEYS), f"telemetry keys {present} of {GpuTelemetry.KEYS}"
        key("telemetry", ", ".join(f"{k} {m[k]:.1f}" for k in present))
        return None

    def cuda_graph():
        used = record.get("cuda_graph", [])
        assert used and all(used) == (not DRY), f"the loop asked for the CUDA graph in {used}"
        return f"{len(used)} generations, cuda_graph={used[0]}"

    def weights_moved():
        step = out / "checkpoints" / "step-000001"
        assert (step / "COMPLETE").exists(), f"no complete checkpoint in {step.parent}"
        before = load_file(next(folder.glob("*.safetensors")))
        after = load_file(step / "model.safetensors")
        changed = sum(int((after[k] != before[k]).sum()) for k in after)
        total = sum(t.numel() for t in after.values())
        dtype = torch.float32 if DRY else torch.bfloat16  # the checkpoint's on CUDA; a CPU run loads fp32
        assert all(t.dtype == dtype for t in after.values()), f"the checkpoint is not {dtype}"
        key("weights changed", f"{changed / total:.2%} of {total:,} {str(dtype)[6:]} weights after one step "
                               "at lr 2e-6")
        assert changed > 0, "no bf16 weight changed"
        return None

    checks.run("metrics line", metrics_line)
    checks.run("GPU telemetry keys", telemetry)
    checks.run("CUDA-graph decoder used", cuda_graph)
    checks.run("checkpoint saved, weights moved", weights_moved)
    return checks.finish() or (1 if code else 0)


# --- (d) attention throughput ----------------------------------------------------------------------

def stage_attention() -> int:
    os.environ.setdefault("OUT_MD", "")
    sys.path.insert(0, str(ROOT))
    from bench import gpu_attention
    peak = gpu_attention.matmul_peak()
    key("bf16 matmul peak", f"{peak:.0f} TFLOP/s (8k x 8k)")
    rows = []
    for length in ([4096, 16384, 65536] if not DRY else [64]):
        rows += gpu_attention.attention_rows(length, **({} if not DRY else dict(heads=2, dtype=torch.float16)))
    print(gpu_attention.throughput_table(rows, peak))
    sdpa = {r["L"]: r for r in rows if r["what"] == "SDPA"}
    for r in rows:
        s = sdpa[r["L"]]
        key(f"L={r['L']} {r['what']}", f"fwd {r['fwd']:.0f} ({r['fwd'] / s['fwd']:.2f}x SDPA, {r['fwd'] / peak:.0%} of "
                                       f"peak), fwd+bwd {r['fwd_bwd']:.0f} ({r['fwd_bwd'] / s['fwd_bwd']:.2f}x SDPA) "
                                       "TFLOP/s")
    return 0


# --- (e) fused log-prob memory and time -------------------------------------------------------------

def stage_logprob() -> int:
    shape = ["--tokens", "32768", "--hidden", "4096", "--vocab", "128256"] if not DRY else \
        ["--tokens", "64", "--hidden", "32", "--vocab", "5000"]
    cmd = [sys.executable, str(ROOT / "bench" / "test_bench_logprob.py"), "--compare", "naive", "fused",
           "--device", DEV, "--dtype", "bf16" if not DRY else "fp32", *shape, "--reps", "3" if not DRY else "1"]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout + done.stderr, flush=True)
    if done.returncode:
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    for name, r in (result.items() if isinstance(result, dict) else []):
        if isinstance(r, dict):
            key(name, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                                if not isinstance(v, (dict, list))))
    return 0


# --- (f) sampler throughput -------------------------------------------------------------------------

def stage_sampler() -> int:
    if DRY:
        os.environ["SPELL_KERNELS"] = "torch"
    import transformers

    from spell_core.models.model import load_pretrained
    from spell_core.sampling.sampler import generate
    work = Path(os.environ.get("WORK") or tempfile.mkdtemp(prefix="first-contact-"))
    folder = _model_folder(work / "sampler-model", torch.bfloat16 if not DRY else torch.float32)
    model, tokenizer = load_pretrained(folder, device=DEV)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=model.lm_head_weight.dtype).to(DEV)
    samples, prompt_len, new = (32, 1024, 128) if not DRY else (2, 16, 4)
    prompt = torch.randint(100, 40000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    rates = {}
    for graph in ([False, True] if not DRY else [False]):
        for _ in range(2):  # the first compiles / captures
            events = []
            generate(model, None, [prompt], n=samples, max_new_tokens=new, temperature=0.7, seed=0, ignore_eos=True,
                     cuda_graph=graph, progress=events.append)
        decode = [e for e in events if e.stage == "decode"]
        rates[f"ours, {'CUDA graph' if graph else 'eager'}"] = sum(e.tokens for e in decode) / sum(
            e.seconds for e in decode)
    ids = prompt[None].repeat(samples, 1).to(DEV)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, max_new_tokens=new, min_new_tokens=new, pad_token_id=2)
    hf.generate(ids, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))
    sync()
    start = time.perf_counter()
    hf.generate(ids, **kwargs)
    sync()
    rates["transformers generate (prefill included)"] = samples * new / (time.perf_counter() - start)
    for name, rate in rates.items():
        key(name, f"{rate:.0f} tokens/s ({samples} samples of a {prompt_len}-token prompt, {new} new tokens)")
    return 0


# --- (g) MoE grouped GEMM ---------------------------------------------------------------------------

def _moe_check(dtype):
    """Ours and the loop in dtype against the loop in float64: ours within 2x the loop's own error
    (or a floor: 1e-2 of the largest value in bf16, 1e-4 in fp32)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import test_bench_moe as bm
    from spell_kernels import reference
    shape = dict(hidden=32, inter=16, experts=8, top_k=2) if DRY else dict(hidden=1024, inter=384, experts=32, top_k=8)
    x = bm.make_inputs(40 if DRY else 2048, **shape, dtype=dtype, device=DEV, seed=5)
    x["topk_ids"] = torch.where(x["topk_ids"] == shape["experts"] - 1, 0, x["topk_ids"])  # the last expert: empty
    names = ("hidden", "gate_up_proj", "down_proj", "topk_weights")

    def grads(fn, cast):
        leaves = {k: x[k].detach().to(cast(x[k].dtype)).requires_grad_(True) for k in names}
        out = fn(leaves["hidden"], leaves["gate_up_proj"], leaves["down_proj"], x["topk_ids"], leaves["topk_weights"])
        out.backward(x["grad"].to(out.dtype))
        return [out.detach()] + [leaves[k].grad for k in names]

    import spell_kernels as sk
    ours = grads(sk.moe_experts, lambda d: d)
    again = grads(sk.moe_experts, lambda d: d)
    base = grads(reference.moe_experts, lambda d: d)
    exact = grads(reference.moe_experts, lambda d: torch.float64)
    parts = []
    floor = {torch.bfloat16: 1e-2, torch.float32: 1e-4}[dtype]  # fp32: 3xTF32 dots vs cuBLAS' fp32
    for name, o, b, e in zip(("out", "d_hidden", "d_gate_up", "d_down", "d_weights"), ours, base, exact):
        err, ref_err = _rel_err(o, e), _rel_err(b, e)
        assert err <= max(2 * ref_err, floor), f"{name}: relative error {err:.2e} > 2 x the loop's {ref_err:.2e}"
        parts.append(f"{name} {err:.1e} (loop {ref_err:.1e})")
    assert all(torch.equal(a, b) for a, b in zip(ours, again)), "a rerun is not bitwise equal"
    assert not ours[2][-1].any() and not ours[3][-1].any(), "the empty expert's weight gradients are not exactly 0"
    return ", ".join(parts)


def _moe_cuda_graph():
    """The forward captured in a CUDA graph (no host sync inside) and replayed on new routing."""
    if DEV != "cuda":
        return "no CUDA graph on a dry run"
    sys.path.insert(0, str(ROOT / "bench"))
    import test_bench_moe as bm
    import spell_kernels as sk
    x = bm.make_inputs(256, **bm.QWEN3_30B_A3B, dtype=torch.bfloat16, device=DEV, seed=6)
    args = [x[k].detach() for k in ("hidden", "gate_up_proj", "down_proj", "topk_ids", "topk_weights")]
    with torch.no_grad():
        sk.moe_experts(*args)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sk.moe_experts(*args)
        args[3].copy_(torch.randint(0, 128, args[3].shape, device=DEV))  # replayed ids, any experts
        graph.replay()
        torch.cuda.synchronize()
        want = sk.moe_experts(*args)
    assert torch.equal(out, want), "the replayed graph differs from an eager call on the same routing"
    return "captured and replayed on new ids: equal to eager"


def stage_moe() -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    import test_bench_moe as bm
    checks = Checks()
    for dtype in ([torch.bfloat16, torch.float32] if not DRY else [torch.float32]):
        checks.run(f"grouped GEMM vs loop, {str(dtype)[6:]}", lambda: _moe_check(dtype))
    checks.run("CUDA graph capture", _moe_cuda_graph)
    if checks.failed:
        return checks.finish()
    shape = bm.QWEN3_30B_A3B if not DRY else dict(hidden=32, inter=16, experts=8, top_k=2)
    for tokens in ([4096, 16384] if not DRY else [16]):
        result = bm.compare(tokens, torch.bfloat16 if not DRY else torch.float32, DEV, ("ours", "loop"),
                            reps=3 if not DRY else 1, shape=shape)
        print(json.dumps({"tokens": tokens, **result}), flush=True)
        ours, loop = result["ours"], result["loop"]
        key(f"T={tokens} grouped GEMM", f"fwd {ours['fwd_tflops']:.1f} TFLOP/s ({loop['fwd_s'] / ours['fwd_s']:.2f}x "
                                        f"the loop's {loop['fwd_tflops']:.1f}), fwd+bwd {ours['fwd_bwd_tflops']:.1f} "
                                        f"({loop['fwd_bwd_s'] / ours['fwd_bwd_s']:.2f}x the loop's "
                                        f"{loop['fwd_bwd_tflops']:.1f})")
    return checks.finish()


STAGES = {"env": stage_env, "kernels": stage_kernels, "run": stage_run, "attention": stage_attention,
          "logprob": stage_logprob, "sampler": stage_sampler, "moe": stage_moe}
assert tuple(STAGES) == STAGE_NAMES

if __name__ == "__main__":
    sys.exit(STAGES[sys.argv[1]]())
