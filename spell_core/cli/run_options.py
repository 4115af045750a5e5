"""`run`'s command line: the parser, SPEC.md's GPU defaults and the reduced CPU ones, and the
resolved `RunConfig` and trainer options."""
from __future__ import annotations

import argparse

from spell_core.cli import arg_types
from spell_core.common.cpu_threads import idle_core_threads
from spell_core.selfplay.config import DataOptions, LoopOptions, ModelOptions, RunConfig, SamplingOptions

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

    parser.add_argument("--ctx", type=arg_types.context_length, default=None,
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
    parser.add_argument("--device", type=arg_types.device, default=defaults.model.device,
                        help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--steps", type=arg_types.count(0), default=None, help=f"* self-play steps to run (default: {both('steps')})")
    parser.add_argument("--questions", type=arg_types.count(1), default=None,
                        help=f"* questions generated per round (default: {both('questions')})")
    parser.add_argument("--kept-groups", type=arg_types.count(1), default=None,
                        help=f"* N: responder groups with non-zero reward variance to collect per step "
                             f"(default: {both('kept_groups')})")
    parser.add_argument("--max-rounds", type=arg_types.count(1), default=None,
                        help=f"* cap on generation rounds per step (default: {both('max_rounds')})")
    parser.add_argument("--group-size", type=arg_types.count(2, "with one sample per question rewards cannot vary, so "
                                                    "nothing ever trains"), default=None,
                        help=f"* G: responder samples per question and verifier judgments per answer "
                             f"(default: {both('group_size')})")
    parser.add_argument("--max-new-tokens", type=arg_types.count(1), default=None,
                        help=f"* longest response of every role, in tokens (default: {both('max_new_tokens')})")
    parser.add_argument("--lr", type=arg_types.learning_rate, default=None, help="AdamW learning rate, constant (default: 2e-6)")
    parser.add_argument("--micro-batch-tokens", type=arg_types.count(1), default=None,
                        help=f"* packed tokens per forward/backward pass (default: {both('micro_batch_tokens')})")
    parser.add_argument("--save-every", type=arg_types.count(1), default=None,
                        help=f"* checkpoint every this many steps, and always at exit (default: {both('save_every')})")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the latest complete checkpoint in --out, or from the checkpoint PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out that holds one: the old run is moved aside whole "
                             "(OUT.replaced-DATE-TIME)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="--resume with options that differ from the stored run's config.json (listed)")
    parser.add_argument("--kv-budget-tokens", type=arg_types.count(1), default=None,
                        help="sampler KV cache size in tokens; prompts beyond it run in waves "
                             "(default: everything at once on a CPU, half the free memory on a GPU)")
    parser.add_argument("--questioner-reward", choices=("gaussian", "linear", "triangle"), default="gaussian",
                        help="questioner reward: SPELL's gaussian, or the ablations linear (1 - r) and "
                             "triangle (1 - 2|r - 0.5|) (default: gaussian)")
    parser.add_argument("--shuffle-options", action=argparse.BooleanOptionalAction, default=False,
                        help="permute the four options of every generated multiple-choice question (and its answer "
                             "letter) before the responders see it, so that the questioner's favourite letters are "
                             "not taught to the responders (default: off, as the method)")
    _add_method_options(parser)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in backward: a quarter more compute for much less memory "
                             "(default: off)")
    parser.add_argument("--routing-replay", action=argparse.BooleanOptionalAction, default=None,
                        help="mixture-of-experts models: train with the experts the sampler chose for each token "
                             "(the gate weights still come from the live router), so near-ties in the router cannot "
                             "make the trainer's log-probs drift from the sampler's (default: on; dense models: no "
                             "effect)")
    parser.add_argument("--overlap-grounding", action=argparse.BooleanOptionalAction, default=None,
                        help="sample the grounding filter's answers together with the responders' (one decode loop "
                             "instead of two; the answers to questions the filter rejects are dropped) (default: on "
                             "for a CPU run, where a decode step costs nearly the same for 8 rows or 40; off on a GPU)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each decode step as a CUDA graph (default: on a GPU when the model supports it)")
    parser.add_argument("--rollback-snapshot", action=argparse.BooleanOptionalAction, default=None,
                        help="keep a host copy of the weights and optimizer state before each optimizer step, to "
                             "roll back a step that leaves NaN/Inf weights (default: on a GPU; off on a CPU, where "
                             "the copy costs 3x the weights in memory and a NaN/Inf step stops the run unsaved)")
    parser.add_argument("--return-freed-memory", action=argparse.BooleanOptionalAction, default=False,
                        help="CPU runs: let glibc give every freed block of 1 MiB or more back to the system, so the "
                             "resident set follows the live tensors (peak about a quarter lower, about a fifth more "
                             "CPU time in page faults; bench/results/loop.md); default off")
    parser.add_argument("--offload-while-sampling", choices=("auto", "on", "off"), default="auto",
                        help="move AdamW's moments and the fp32 weights (what the sampler does not read) to host "
                             "memory while the sampler runs, back before each update; the weights and optimizer "
                             "state stay bitwise the same. auto: on a GPU, what the memory plan needs for sampling "
                             "to fit (python -m spell_core.plan), nothing when it fits as is or on a CPU, where "
                             "host and device memory are one (default: auto)")
    parser.add_argument("--threads", type=arg_types.count(0), default=None,
                        help="CPU threads of torch; 0: torch's default, one per core (default on a CPU run: the "
                             "idle cores (measured over half a second), at least 1, since a thread waiting for "
                             "a busy core slows every matrix product; 0 on a GPU run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    parser.add_argument("--cp", type=arg_types.count(1), default=1,
                        help="context parallel size: ranks sharing each training sequence (zigzag ring attention); "
                             "launch with torchrun --nproc-per-node N, N a multiple of it; the other factor is data "
                             "parallel (default: 1)")
    parser.add_argument("--dist-timeout", type=arg_types.SECONDS, default=600.0, metavar="SECONDS",
                        help="under torchrun: collective timeout, and how long a rank may hang before the others "
                             "exit naming it (a dead rank is noticed within min(60, this)) (default: 600)")
    # validation during training (spell_core/cli/validation.py)
    parser.add_argument("--eval-data", default=None, metavar="FILE",
                        help="evaluate the model on these questions (any format of python -m spell_core.eval) at "
                             "step 0 and every --eval-every steps: pass@k per task type in metrics.jsonl/png")
    parser.add_argument("--eval-every", type=arg_types.count(1), default=10, help="steps between evaluations (default: 10)")
    parser.add_argument("--eval-n", type=arg_types.count(1), default=4, help="samples per eval question (default: 4)")
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
    parser.add_argument("--clip-low", type=arg_types.CLIP_LOW, default=0.2, help="PPO ratio clip below 1 (default: 0.2)")
    parser.add_argument("--clip-high", type=arg_types.CLIP_HIGH, default=0.2, help="PPO ratio clip above 1 (default: 0.2)")
    parser.add_argument("--dual-clip", type=arg_types.dual_clip, default=3.0,
                        help="dual clip c > 1: the loss of a negative-advantage token is at most -A c; 0: off "
                             "(default: 3)")
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="pass enable_thinking to chat templates that take it (Qwen3); with it on, a GPU run's "
                             f"responses default to {THINKING_MAX_NEW_TOKENS} tokens (default: the template's own)")


def _report_to_argument(text: str) -> tuple[str, ...]:
    from spell_core.cli.reporters import ReporterError, parse_report_to

    try:
        return parse_report_to(text)
    except ReporterError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
        from spell_core.data.task_types import TaskRules

        args.task_rules = TaskRules.parse(args.tasks)
    except ValueError as err:
        parser.error(str(err))
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
                         questioner_reward=args.questioner_reward, shuffle_options=args.shuffle_options,
                         kv_budget_tokens=args.kv_budget_tokens,
                         memory_admission=args.memory_admission, enable_thinking=args.enable_thinking,
                         overlap_grounding=args.overlap_grounding, cuda_graph=args.cuda_graph),
        out=args.out,
        seed=args.seed,
        steps=args.steps,
        save_every=args.save_every,
    )
    return config, args


def trainer_options(config: RunConfig, args: argparse.Namespace):
    from spell_core.training.trainer import TrainerOptions

    options = TrainerOptions(micro_batch_tokens=args.micro_batch_tokens, temperature=config.sampling.temperature,
                             gradient_checkpointing=args.gradient_checkpointing, clip_low=args.clip_low,
                             clip_high=args.clip_high, dual_clip=args.dual_clip or None,
                             rollback_snapshot=args.rollback_snapshot, agg=args.loss_agg,
                             offload_while_sampling="all" if args.offload_while_sampling == "on" else "off",
                             routing_replay=args.routing_replay)
    if args.lr is not None:
        options.lr = args.lr
    return options


def offload_level(choice: str, offloaded: list[str]) -> str:
    """TrainerOptions.offload_while_sampling for --offload-while-sampling `choice`, given what the
    memory plan moves to host memory for sampling to fit (`MemoryPlan.offloaded`, moments first):
    on moves everything, off nothing, auto what the plan moves."""
    if choice != "auto":
        return "all" if choice == "on" else "off"
    return ("off", "moments", "all")[min(len(offloaded), 2)]


def spec_value(key: str) -> str:
    value = GPU_DEFAULTS[key]
    return f"{value // 1024}k" if key == "ctx" else str(value)
