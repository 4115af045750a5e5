"""`python -m spell_core.run`: the command users type.

Resolves the configuration (SPEC.md's defaults on a GPU, reduced ones on a CPU), loads the
model and the documents, then runs self-play steps: `SelfPlay.step()` -> `Trainer.train_step`
-> monitor -> a checkpoint every `--save-every` steps and at exit. `--resume` continues from
the latest complete checkpoint. SIGINT / SIGTERM abandon the step in flight (or let a
running optimizer step finish), save, and exit; a second signal stops at once.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from spell_core.cli.run_folder import flatten_config
from spell_core.cli.run_options import (CPU_DEFAULTS, GPU_DEFAULTS, THINKING_MAX_NEW_TOKENS, build_parser,  # noqa: F401 (public names of run)
                                        config_from_args, spec_value, trainer_options)
from spell_core.cli.run_setup import gpu_kv_budget, load_model_and_documents
from spell_core.cli.run_steps import StopFlag, run_steps
from spell_core.data.documents import CorpusError
from spell_core.models.assets import AssetError
from spell_core.selfplay.config import RunConfig


def main(argv: list[str] | None = None) -> int:
    config, args = config_from_args(argv)
    budget = config.cluster_budget
    train_options = trainer_options(config, args)
    print("spell: resolved configuration")
    for key, value in flatten_config({**config.to_dict(), "trainer": asdict(train_options)}):
        print(f"  {key:<34} {value}")
    if args.reduced:
        spec = " ".join(f"--{k.replace('_', '-')} {spec_value(k)}" for k in args.reduced)
        print(f"spell: no GPU: reduced CPU defaults for {', '.join(args.reduced)} so that a step finishes in "
              f"minutes; the GPU defaults (SPEC.md's scale) are {spec}")
    try:
        from spell_core.cli.input_checks import check_run_inputs, run_documents
        from spell_core.cli.validation import Validation

        args.validation = Validation.from_args(args, config)  # None without --eval-data; a bad file stops here
        check_run_inputs(config, args)  # the model exists, --out apart from the inputs, --resume has a checkpoint
        args.documents = run_documents(config)  # corpus, fields and --tasks rules, before the model loads
        with _own_run_folder(config, args, train_options):
            return _run(config, args, train_options, budget)
    except (AssetError, CorpusError, ValueError) as err:  # bad model, corpus, checkpoint or option: no traceback
        print(f"spell: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run loop started
        print("\nspell: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130


def _own_run_folder(config: RunConfig, args, train_options):
    """--out checked, locked and claimed for this run before the model loads (spell_core/cli/run_folder.py);
    only rank 0 of a torchrun job does it."""
    import contextlib
    import os

    from spell_core.cli import preflight, run_folder
    from spell_core.models.assets import resolve_model

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


def _run(config: RunConfig, args, train_options, budget: int) -> int:
    import torch

    torch.manual_seed(config.seed)
    if args.return_freed_memory and not str(config.model.device).startswith("cuda"):
        from spell_core.common.host_memory import return_freed_memory
        return_freed_memory()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
        print(f"threads     {args.threads} ({args.threads_why})")
    try:
        return _train_on_ranks(config, args, train_options, budget)
    finally:
        torch.set_num_threads(threads)


def _train_on_ranks(config: RunConfig, args, train_options, budget: int) -> int:
    """_train in this process, or as one rank of a torchrun job (spell_core/distributed/process_groups.py)."""
    from spell_core.distributed.process_groups import failure_guard, init_distributed, log_other_ranks_to_files, shutdown

    topology = init_distributed(args.cp, device=config.model.device, timeout_s=args.dist_timeout)
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
    from spell_core.cli.monitor import Monitor
    from spell_core.cli.run_folder import holds_a_run as run_folder_has_run

    validation = args.validation
    if str(config.model.device).startswith("cuda"):  # stop now, not with an out-of-memory error minutes later
        from spell_core.cli.run_options import offload_level
        from spell_core.plan import check_run_fits
        plan = check_run_fits(config, args, topology)
        train_options.offload_while_sampling = offload_level(args.offload_while_sampling, plan.offloaded)
        if train_options.offload_while_sampling != "off":
            print(f"offload     {' and '.join(plan.offloaded)} to host memory while sampling "
                  "(--offload-while-sampling)")
    model, tokenizer, clusters = load_model_and_documents(config, budget, getattr(args, "documents", None))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "trainer": asdict(train_options)},
                                                indent=2) + "\n")
    print(f"config      written to {out / 'config.json'}")
    if config.steps == 0:
        print("spell: --steps 0: nothing to train.")
        return 0
    if config.loop.kv_budget_tokens is None and str(next(model.parameters()).device).startswith("cuda"):
        config.loop.kv_budget_tokens = gpu_kv_budget(model)
        print(f"kv cache    {config.loop.kv_budget_tokens:,} tokens (half the free GPU memory; --kv-budget-tokens)")

    from spell_core.training import train_state
    from spell_core.training.trainer import Trainer

    from spell_core.selfplay.data_parallel import self_play_for_rank
    from spell_core.distributed.process_groups import Topology

    topology = topology or Topology()
    trainer = Trainer(model, train_options, topology)
    stop = StopFlag()
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
        return run_steps(config, args, out, start_step, model, tokenizer, trainer, play, monitor, stop, topology,
                      validation)
    finally:
        monitor.close()


if __name__ == "__main__":
    sys.exit(main())
