"""`python -m spell_core.run`: the command users type.

Resolves the configuration (SPEC.md's defaults on a GPU, reduced ones on a CPU), loads the
model and the documents, then runs self-play steps: `SelfPlay.step()` -> `Trainer.train_step`
-> monitor -> a checkpoint every `--save-every` steps and at exit. `--resume` continues from
the latest complete checkpoint. SIGINT / SIGTERM abandon the step in flight (or let a
running optimizer step finish), save, and exit; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import collections
import json
import signal
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from spell_core.assets import AssetError
from spell_core.config import DataOptions, LoopOptions, ModelOptions, RunConfig, SamplingOptions, parse_ctx
from spell_core.cpu_threads import idle_core_threads
from spell_core.data import CorpusError
from spell_core.run_folder import flatten_config

# SPEC.md's scale (one GPU: 480 questions a round, at most 10 rounds, N = 128 kept groups) and
# the reduced defaults that let `make run` finish a real step on a 2-core CPU in minutes.
# ctx is the document budget of a cluster (the prompt and the response come on top).
GPU_DEFAULTS = dict(ctx=16 * 1024, steps=70, questions=480, kept_groups=128, max_rounds=10, group_size=8,
                    max_new_tokens=4096, micro_batch_tokens=32768, save_every=10)
CPU_DEFAULTS = dict(ctx=512, steps=1, questions=8, kept_groups=8, max_rounds=1, group_size=4,
                    max_new_tokens=160, micro_batch_tokens=2048, save_every=1)
# Chosen by measurement on a 2-core CPU (bench/results/loop.md): a step of the 0.5B default is
# ~45 % update (compute-bound, ~46 ms a forwarded token on one thread) and ~55 % sampling, whose
# decode steps cost about the same for 8 rows as for 40. 2048-token micro-batches with stored
# activations peak at 13 GB (8192 tokens: 18.2 GB, killed on a 24 GB machine); a responder group
# (512 + ~250 prompt + 4 x 160) fits one micro-batch.
THINKING_MAX_NEW_TOKENS = 20 * 1024  # SPEC: 20k-token responses for reasoning models (GPU default)
KNOBS = ("ctx", "steps", "questions", "kept_groups", "max_rounds", "group_size", "max_new_tokens",
         "micro_batch_tokens", "save_every")


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="python -m spell_core.run",
        description="SPELL self-play RL on long documents (one model: questioner, responder, verifier). "
                    "Options marked * default to SPEC.md's values on a GPU and to reduced values on a CPU "
                    "(GPU / CPU shown).",
    )
    def both(key):
        return f"{GPU_DEFAULTS[key]} / {CPU_DEFAULTS[key]}"

    parser.add_argument("--ctx", type=_ctx_argument, default=None,
                        help="* document budget per cluster in tokens: 16k, 128k, 131072, 1m (default: 16k / 1k); "
                             "the instructions and the response come on top, and RoPE scaling (YaRN) extends the "
                             "model only when its native context cannot hold ctx + prompt + response")
    parser.add_argument("--model", default=defaults.model.name,
                        help="model alias, local Hugging Face checkpoint folder, or Hub id Org/Name[@revision] "
                             f"(default: {defaults.model.name})")
    parser.add_argument("--corpus", nargs="+", default=[defaults.data.corpus], metavar="CORPUS",
                        help="corpus alias, folder of .txt/.md/.jsonl files, or one or more .parquet / .jsonl tables or "
                             "folders saved by datasets' save_to_disk (SPELL's training parquet files included) "
                             f"(default: {defaults.data.corpus})")
    parser.add_argument("--text-field", default=defaults.data.text_field,
                        help=f"table corpora: the column holding a document (default: {defaults.data.text_field})")
    parser.add_argument("--cluster-field", default=defaults.data.cluster_field,
                        help="table corpora: the column whose equal values mark related documents "
                             f"(default: {defaults.data.cluster_field})")
    parser.add_argument("--out", default=defaults.out,
                        help=f"run folder: config, metrics, plot, checkpoints (default: {defaults.out})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"random seed (default: {defaults.seed})")
    parser.add_argument("--device", type=_device_argument, default=defaults.model.device,
                        help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--steps", type=_count(0), default=None, help=f"* self-play steps to run (default: {both('steps')})")
    parser.add_argument("--questions", type=_count(1), default=None,
                        help=f"* questions generated per round (default: {both('questions')})")
    parser.add_argument("--kept-groups", type=_count(1), default=None,
                        help=f"* N: responder groups with non-zero reward variance to collect per step "
                             f"(default: {both('kept_groups')})")
    parser.add_argument("--max-rounds", type=_count(1), default=None,
                        help=f"* cap on generation rounds per step (default: {both('max_rounds')})")
    parser.add_argument("--group-size", type=_count(2, "with one sample per question rewards cannot vary, so "
                                                    "nothing ever trains"), default=None,
                        help=f"* G: responder samples per question and verifier judgments per answer "
                             f"(default: {both('group_size')})")
    parser.add_argument("--max-new-tokens", type=_count(1), default=None,
                        help=f"* longest response of every role, in tokens (default: {both('max_new_tokens')})")
    parser.add_argument("--lr", type=_learning_rate, default=None, help="AdamW learning rate, constant (default: 2e-6)")
    parser.add_argument("--micro-batch-tokens", type=_count(1), default=None,
                        help=f"* packed tokens per forward/backward pass (default: {both('micro_batch_tokens')})")
    parser.add_argument("--save-every", type=_count(1), default=None,
                        help=f"* checkpoint every this many steps, and always at exit (default: {both('save_every')})")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the latest complete checkpoint in --out, or from the checkpoint PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out that holds one: the old run is moved aside whole "
                             "(OUT.replaced-DATE-TIME)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="--resume with options that differ from the stored run's config.json (listed)")
    parser.add_argument("--kv-budget-tokens", type=_count(1), default=None,
                        help="sampler KV cache size in tokens; prompts beyond it run in waves "
                             "(default: everything at once on a CPU, half the free memory on a GPU)")
    parser.add_argument("--questioner-reward", choices=("gaussian", "linear", "triangle"), default="gaussian",
                        help="questioner reward: SPELL's gaussian, or the ablations linear (1 - r) and "
                             "triangle (1 - 2|r - 0.5|) (default: gaussian)")
    _add_method_options(parser)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in backward: a quarter more compute for much less memory "
                             "(default: off)")
    parser.add_argument("--overlap-grounding", action=argparse.BooleanOptionalAction, default=None,
                        help="sample the grounding filter's answers together with the responders' (one decode loop "
                             "instead of two; the answers to questions the filter rejects are dropped) (default: on "
                             "for a CPU run, where a decode step costs nearly the same for 8 rows or 40; off on a GPU)")
    parser.add_argument("--rollback-snapshot", action=argparse.BooleanOptionalAction, default=None,
                        help="keep a host copy of the weights and optimizer state before each optimizer step, to "
                             "roll back a step that leaves NaN/Inf weights (default: on a GPU; off on a CPU, where "
                             "the copy costs 3x the weights in memory and a NaN/Inf step stops the run unsaved)")
    parser.add_argument("--threads", type=_count(0), default=None,
                        help="CPU threads of torch; 0: torch's default, one per core (default on a CPU run: the "
                             "idle cores (measured over half a second), at least 1, since a thread waiting for "
                             "a busy core slows every matrix product; 0 on a GPU run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    parser.add_argument("--cp", type=_count(1), default=1,
                        help="context parallel size: ranks sharing each training sequence (zigzag ring attention); "
                             "launch with torchrun --nproc-per-node N, N a multiple of it; the other factor is data "
                             "parallel (default: 1)")
    parser.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="under torchrun: collective timeout, and how long a rank may hang before the others "
                             "exit naming it (a dead rank is noticed within min(60, this)) (default: 600)")
    # validation during training (spell_core/validation.py)
    parser.add_argument("--eval-data", default=None, metavar="FILE",
                        help="evaluate the model on these questions (any format of python -m spell_core.eval) at "
                             "step 0 and every --eval-every steps: pass@k per task type in metrics.jsonl/png")
    parser.add_argument("--eval-every", type=_count(1), default=10, help="steps between evaluations (default: 10)")
    parser.add_argument("--eval-n", type=_count(1), default=4, help="samples per eval question (default: 4)")
    parser.add_argument("--report-to", type=_report_to_argument, default=(), metavar="NAMES",
                        help="also send every step's metrics and questions to tensorboard, wandb (comma-separated) or "
                             "none; W&B runs offline without an API key (default: none)")
    return parser


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """SPELL's switches (SPEC.md): task types per corpus, memory admission, PPO clips, thinking."""
    parser.add_argument("--tasks", action="append", default=None, metavar="[PREFIX=]TYPES",
                        help="task types asked of the documents, from doc_qa, doc_math, doc_mc: TYPES for the whole "
                             "corpus (e.g. doc_qa,doc_mc), PREFIX=TYPES for documents whose source name (jsonl "
                             "data_source, else file path) starts with PREFIX; repeatable. A jsonl field 'tasks' "
                             "wins; built in: docmath=doc_math, ultrafineweb=doc_qa,doc_mc; else all three")
    parser.add_argument("--memory-admission", choices=("released", "paper"), default="released",
                        help="which questions enter the history memory by mean responder reward r: released "
                             "(the method's code: 0.01 <= r <= 1) or paper (0 < r < 1) (default: released)")
    parser.add_argument("--loss-agg", choices=("released", "token-mean", "seq-mean-token-mean"), default=None,
                        help="how response tokens weigh in the loss: released (the released trainer's per-micro-batch "
                             "token-means, whatever --micro-batch-tokens), token-mean (one mean over the step's "
                             "tokens) or seq-mean-token-mean; docs/fidelity.md (default: released on one process, "
                             "token-mean on several ranks)")
    parser.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below 1 (default: 0.2)")
    parser.add_argument("--clip-high", type=float, default=0.2, help="PPO ratio clip above 1 (default: 0.2)")
    parser.add_argument("--dual-clip", type=float, default=3.0,
                        help="dual clip c > 1: the loss of a negative-advantage token is at most -A c; 0: off "
                             "(default: 3)")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="pass enable_thinking to chat templates that take it (Qwen3); with it on, a GPU run's "
                             f"responses default to {THINKING_MAX_NEW_TOKENS} tokens (default: the template's own)")


def _report_to_argument(text: str) -> tuple[str, ...]:
    from spell_core.reporters import ReporterError, parse_report_to

    try:
        return parse_report_to(text)
    except ReporterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _ctx_argument(text: str) -> int:
    try:
        return parse_ctx(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _count(minimum: int, why: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}" + (f": {why}" if why else ""))
        return value
    return parse


def _learning_rate(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _device_argument(text: str) -> str:
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"device {text!r} is not understood: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for, but no CUDA GPU is available; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device {text!r}: only cpu and cuda are supported")
    return text


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def config_from_args(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    """The run configuration and the parsed arguments; device-dependent options that were not
    given take the GPU or CPU defaults (`args.reduced` lists the CPU ones that were used)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from spell_core.task_types import TaskRules

        args.task_rules = TaskRules.parse(args.tasks)
    except ValueError as err:
        parser.error(str(err))
    if args.dual_clip and args.dual_clip <= 1:
        parser.error(f"--dual-clip must be > 1 (or 0: off), got {args.dual_clip}")
    device = _resolve_device(args.device)
    if args.enable_thinking and args.max_new_tokens is None and device.startswith("cuda"):
        args.max_new_tokens = THINKING_MAX_NEW_TOKENS
    table = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    args.reduced = []
    args.threads_why = "--threads"
    if args.threads is None:
        args.threads, args.threads_why = (0, "") if table is GPU_DEFAULTS else idle_core_threads()
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = False
    if args.overlap_grounding is None:
        args.overlap_grounding = table is CPU_DEFAULTS
    for key in KNOBS:
        if getattr(args, key) is None:
            setattr(args, key, table[key])
            if table is CPU_DEFAULTS and CPU_DEFAULTS[key] != GPU_DEFAULTS[key]:
                args.reduced.append(key)
    config = RunConfig(
        model=ModelOptions(name=args.model, device=device),
        data=DataOptions(corpus=args.corpus[0] if len(args.corpus) == 1 else args.corpus, ctx=args.ctx,
                         text_field=args.text_field, cluster_field=args.cluster_field, tasks=list(args.tasks or [])),
        sampling=SamplingOptions(max_response_tokens=args.max_new_tokens, group_size=args.group_size),
        loop=LoopOptions(questions=args.questions, kept_groups=args.kept_groups, max_rounds=args.max_rounds,
                         questioner_reward=args.questioner_reward, kv_budget_tokens=args.kv_budget_tokens,
                         memory_admission=args.memory_admission, enable_thinking=args.enable_thinking,
                         overlap_grounding=args.overlap_grounding),
        out=args.out,
        seed=args.seed,
        steps=args.steps,
        save_every=args.save_every,
    )
    return config, args


def trainer_options(config: RunConfig, args: argparse.Namespace):
    from spell_core.trainer import TrainerOptions

    options = TrainerOptions(micro_batch_tokens=args.micro_batch_tokens, temperature=config.sampling.temperature,
                             gradient_checkpointing=args.gradient_checkpointing, clip_low=args.clip_low,
                             clip_high=args.clip_high, dual_clip=args.dual_clip or None,
                             rollback_snapshot=args.rollback_snapshot, agg=args.loss_agg or "released")
    if args.lr is not None:
        options.lr = args.lr
    return options


def main(argv: list[str] | None = None) -> int:
    config, args = config_from_args(argv)
    budget = config.cluster_budget
    train_options = trainer_options(config, args)
    print("spell: resolved configuration")
    for key, value in flatten_config({**config.to_dict(), "trainer": asdict(train_options)}):
        print(f"  {key:<34} {value}")
    if args.reduced:
        spec = " ".join(f"--{k.replace('_', '-')} {_spec_value(k)}" for k in args.reduced)
        print(f"spell: no GPU: reduced CPU defaults for {', '.join(args.reduced)} so that a step finishes in "
              f"minutes; the GPU defaults (SPEC.md's scale) are {spec}")
    try:
        from spell_core.validation import Validation

        args.validation = Validation.from_args(args, config)  # None without --eval-data; a bad file stops here
        with _own_run_folder(config, args, train_options):
            return _run(config, args, train_options, budget)
    except (AssetError, CorpusError, ValueError) as err:  # bad model, corpus, checkpoint or option: no traceback
        print(f"spell: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run loop started
        print("\nspell: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130


def _own_run_folder(config: RunConfig, args, train_options):
    """--out checked, locked and claimed for this run before the model loads (spell_core/run_folder.py);
    only rank 0 of a torchrun job does it."""
    import contextlib
    import os

    from spell_core import preflight, run_folder
    from spell_core.assets import resolve_model

    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    model_folder = resolve_model(config.model.name)  # a missing model is named first
    claimed = run_folder.claim(config.out, {**config.to_dict(), "trainer": asdict(train_options)},
                               resume=args.resume is not None, overwrite=args.overwrite,
                               allow_config_change=args.allow_config_change)
    stack = contextlib.ExitStack()
    out = stack.enter_context(claimed)
    try:
        needed = preflight.checkpoint_bytes(model_folder, config.model.device)
        run_folder.check_free_space(out, needed, "a checkpoint (weights and optimizer state)")
    except BaseException:
        stack.close()
        raise
    return stack


def _spec_value(key: str) -> str:
    value = GPU_DEFAULTS[key]
    return f"{value // 1024}k" if key == "ctx" else str(value)


def _run(config: RunConfig, args, train_options, budget: int) -> int:
    import torch

    torch.manual_seed(config.seed)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
        print(f"threads     {args.threads} ({args.threads_why})")
    try:
        return _train_on_ranks(config, args, train_options, budget)
    finally:
        torch.set_num_threads(threads)


def _train_on_ranks(config: RunConfig, args, train_options, budget: int) -> int:
    """_train in this process, or as one rank of a torchrun job (spell_core/distributed.py)."""
    from spell_core.distributed import failure_guard, init_distributed, log_other_ranks_to_files, shutdown

    topology = init_distributed(args.cp, device=config.model.device, timeout_s=args.dist_timeout)
    if topology.is_distributed and args.loss_agg is None:  # released weights: one process only (docs/fidelity.md)
        train_options.agg = "token-mean"
    if not topology.is_distributed:
        return _train(config, args, train_options, budget, topology)
    config.model.device = str(topology.device)
    log_other_ranks_to_files(topology, Path(config.out) / "logs")
    print(f"ranks       {topology.describe()}")
    with failure_guard(topology):
        code = _train(config, args, train_options, budget, topology)
    shutdown(topology)  # only after a clean finish: after an error the other ranks see this one fall silent
    return code


def _train(config: RunConfig, args, train_options, budget: int, topology=None) -> int:
    from spell_core.monitor import Monitor
    from spell_core.run_folder import holds_a_run as run_folder_has_run

    validation = args.validation
    if str(config.model.device).startswith("cuda"):  # stop now, not with an out-of-memory error minutes later
        from spell_core.plan import check_run_fits
        check_run_fits(config, args, topology)
    model, tokenizer, clusters = _load_model_and_documents(config, budget)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "trainer": asdict(train_options)},
                                                indent=2) + "\n")
    print(f"config      written to {out / 'config.json'}")
    if config.steps == 0:
        print("spell: --steps 0: nothing to train.")
        return 0
    if config.loop.kv_budget_tokens is None and str(next(model.parameters()).device).startswith("cuda"):
        config.loop.kv_budget_tokens = _gpu_kv_budget(model)
        print(f"kv cache    {config.loop.kv_budget_tokens:,} tokens (half the free GPU memory; --kv-budget-tokens)")

    from spell_core import train_state
    from spell_core.trainer import Trainer

    from spell_core.data_parallel import self_play_for_rank
    from spell_core.distributed import Topology

    topology = topology or Topology()
    trainer = Trainer(model, train_options, topology)
    stop = _StopFlag()
    play = self_play_for_rank(model, tokenizer, clusters, config, topology, should_stop=stop.is_set)
    start_step = 0
    if args.resume is not None:
        if args.resume == "latest" and train_state.find_latest(out) is None:
            fresh = "--overwrite instead of --resume" if run_folder_has_run(out) else "without --resume"
            raise ValueError(f"--resume: no complete checkpoint in {out}; start it again ({fresh}), or pass a "
                             "checkpoint folder: --resume PATH")
        if args.resume == "latest":  # a corrupt newest checkpoint: the older complete one, said so
            path, start_step, extra = train_state.load_usable(out, model, trainer.optimizer)
        else:
            path = Path(args.resume)
            start_step, extra = train_state.load(path, model, trainer.optimizer)
        play.load_state_dict(extra["self_play"])
        print(f"resumed     from {path} at step {start_step}")
        if topology.is_main:
            for line in train_state.tidy(out, keep=path):
                print(f"checkpoints {line}")
    monitor = Monitor(out if topology.is_main else out / "ranks" / f"rank{topology.rank}", config.steps,
                      bars=not args.no_progress and topology.is_main,
                      resume_step=start_step if args.resume is not None else None,
                      report_to=args.report_to if topology.is_main else (),
                      config={**config.to_dict(), "trainer": asdict(train_options)})
    play.observer = monitor
    if validation and args.resume is None:
        validation.log_start(monitor, validation.at_step(model, tokenizer, 0, topology))
    try:
        return _steps(config, args, out, start_step, model, tokenizer, trainer, play, monitor, stop, topology,
                      validation)
    finally:
        monitor.close()


def _steps(config: RunConfig, args, out: Path, start_step: int, model, tokenizer, trainer, play, monitor, stop,
           topology, validation) -> int:
    import torch

    from spell_core import train_state
    from spell_core.distributed import agreed
    from spell_core.guards import NonFiniteUpdatesError
    from spell_core.loop import StepAbandoned

    saved_step = start_step if args.resume is not None else None
    step, exit_code = start_step, 0
    with stop.installed():
        while step < config.steps and not agreed(stop.is_set(), topology):  # every rank stops together
            snapshot = play.state_dict()
            began, cpu_began = time.perf_counter(), time.process_time()
            try:
                metrics = _one_step(play, trainer, monitor, stop, step + 1)
            except StepAbandoned:
                play.load_state_dict(snapshot)  # as it was after the last completed step
                break
            except (torch.cuda.OutOfMemoryError, NonFiniteUpdatesError) as err:
                play.load_state_dict(snapshot)  # the update never ran or was rolled back: the last step's weights
                if not getattr(err, "restored", True):
                    saved_step = step  # the weights in memory are NaN/Inf: the last checkpoint stays the last
                advice = f"\n{OOM_ADVICE}" if isinstance(err, torch.cuda.OutOfMemoryError) else ""
                print(f"spell: error: {err}{advice}", file=sys.stderr)
                exit_code = 1
                break
            step += 1
            metrics["step_time_s"] = time.perf_counter() - began
            # this process's CPU time: on a busy machine the wall time says little
            metrics["step_cpu_s"] = time.process_time() - cpu_began
            if validation:
                metrics.update(validation.at_step(model, tokenizer, step, topology))
            monitor.log_step(metrics)
            if step % config.save_every == 0 or step == config.steps:
                _save(train_state, out, step, model, tokenizer, trainer, play, metrics)
                saved_step = step
        if saved_step != step:
            _save(train_state, out, step, model, tokenizer, trainer, play,
                  monitor.history[-1] if monitor.history else {})
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        print(f"spell: {name}: stopped after step {step} and saved; continue with --resume --out {out}")
        return 128 + stop.signum
    if exit_code == 0:
        print(f"spell: done: {step} steps; metrics in {out / 'metrics.jsonl'}, plot in {out / 'metrics.png'}")
    return exit_code


def _one_step(play, trainer, monitor, stop, number: int) -> dict:
    """Generate, select and train once; the step's metrics (loop's, then the trainer's as train_*)."""
    result = play.step()
    monitor.log_questions(number, result.questions)
    metrics = dict(result.metrics)
    if not result.trajectories and not result.metrics.get("trajectories_world"):  # none on any rank
        print(f"spell: step {number}: nothing trainable (no responder group with reward variance, no "
              "questioner sample to contrast); no update", file=sys.stderr)
        return metrics | {"train_skipped": True, "train_skip_reason": "nothing trainable in this step"}
    stop.defer = True  # an optimizer step is never cut in half
    began, cpu_began = time.perf_counter(), time.process_time()
    try:
        with monitor.update(len(result.trajectories)):
            train = trainer.train_step(result.trajectories)
    finally:
        stop.defer = False
    metrics["time_update_s"] = time.perf_counter() - began
    metrics["cpu_update_s"] = time.process_time() - cpu_began
    if train.get("skipped"):
        print(f"spell: step {number}: {train.get('skip_reason')}; the run continues", file=sys.stderr)
    return metrics | {f"train_{k}": v for k, v in train.items()}


OOM_ADVICE = ("spell: the GPU ran out of memory. Knobs, from the cheapest: --micro-batch-tokens (training "
              "activations), --kv-budget-tokens (sampler KV cache), --gradient-checkpointing, --group-size, "
              "--questions, --max-new-tokens, --ctx.")


def _save(train_state, out: Path, step: int, model, tokenizer, trainer, play, metrics: dict) -> None:
    began = time.perf_counter()
    path = train_state.save(out, step, model, tokenizer, trainer.optimizer,
                            {"self_play": play.state_dict(), "metrics": _plain(metrics)})
    print(f"checkpoint  step {step} saved to {path} in {time.perf_counter() - began:.1f} s")


def _plain(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, default=str))


def _gpu_kv_budget(model) -> int:
    import torch

    from spell_core.kv_cache import kv_bytes_per_token

    free, _ = torch.cuda.mem_get_info()
    weight = model.lm_head_weight
    return max(1, int(free * 0.5) // kv_bytes_per_token(model.config, weight.dtype))


class _StopFlag:
    """Set by SIGINT / SIGTERM. While `defer` is true (the optimizer step) the signal only
    sets the flag; a second signal outside it raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signum: int | None = None
        self.defer = False

    def is_set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and not self.defer:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nspell: {signal.Signals(signum).name} received: stopping after saving "
              "(send it again to stop at once, unsaved)", file=sys.stderr, flush=True)

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def scope():
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        return scope()


def _load_model_and_documents(config: RunConfig, budget: int):
    from spell_core.assets import resolve_model
    from spell_core.corpus_tables import load_corpus
    from spell_core.data import build_clusters
    from spell_core.model import load_pretrained
    from spell_core.rope import with_rope_scaling
    from spell_core.task_types import TaskRules

    device = config.model.device
    start = time.perf_counter()
    model_path = resolve_model(config.model.name)
    model, tokenizer = load_pretrained(model_path, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    native_ctx = model.config.max_position_embeddings
    print(f"\nmodel       {model_path} ({model.config.model_type}, {model.config.num_hidden_layers} layers, "
          f"{next(model.parameters()).dtype}, {device}; loaded in {time.perf_counter() - start:.1f} s)")
    print(f"parameters  {n_params:,} ({n_params / 1e6:.1f} M)")
    print(f"vocabulary  {model.config.vocab_size:,} (tokenizer: {len(tokenizer):,} tokens)")
    needed = config.context_needed  # documents + prompt room + response
    if needed > native_ctx:
        model.config = with_rope_scaling(model.config, needed)
        rope = model.config.rope
        print(f"native ctx  {native_ctx:,} tokens; --ctx {config.data.ctx:,} + prompt + response need {needed:,}: "
              f"RoPE scaling applied, {rope['rope_type']} factor {rope['factor']:.2f}")
    else:
        print(f"native ctx  {native_ctx:,} tokens (holds --ctx {config.data.ctx:,} + prompt + response = {needed:,})")
    from spell_core.preflight import long_context_warning
    warning = long_context_warning(model, config.data.ctx, native_ctx, 2 * config.loop.questions)
    if warning:
        print(warning, file=sys.stderr)

    start = time.perf_counter()
    corpus_path = config.data.corpus if isinstance(config.data.corpus, str) else ", ".join(config.data.corpus)
    documents = load_corpus(config.data.corpus, text_field=config.data.text_field,
                            cluster_field=config.data.cluster_field)
    TaskRules.parse(config.data.tasks).apply(documents)
    clusters = build_clusters(documents, tokenizer, budget)
    sizes = [cluster.n_tokens for cluster in clusters]
    n_works = len({doc.group for doc in documents})
    n_pieces = sum(len(cluster.documents) for cluster in clusters)
    split_note = f" ({n_pieces:,} once those over the budget are split)" if n_pieces != len(documents) else ""
    print(f"documents   {len(documents):,}{split_note} from {n_works:,} works, "
          f"{sum(doc.n_tokens for doc in documents):,} tokens, in {corpus_path}")
    print(f"clusters    {len(clusters):,}, at most {budget:,} tokens of documents each (--ctx); "
          f"built in {time.perf_counter() - start:.1f} s")
    kinds = collections.Counter(",".join(cluster.tasks) for cluster in clusters)
    print("task types  " + "; ".join(f"{types}: {n:,} clusters" for types, n in kinds.most_common()))
    print(f"tokens per cluster  min {min(sizes):,}  median {statistics.median(sizes):,.0f}  max {max(sizes):,}")
    return model, tokenizer, clusters


if __name__ == "__main__":
    sys.exit(main())
