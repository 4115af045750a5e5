"""`run`'s step loop: one self-play step and one update after another, checkpoints every
`--save-every` steps and at exit, and what a signal, a non-finite update or an out-of-memory
error does to the step in flight."""
from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from spell_core.selfplay.config import RunConfig

def run_steps(config: RunConfig, args, out: Path, start_step: int, model, tokenizer, trainer, play, monitor, stop,
           topology, validation) -> int:
    import torch

    from spell_core.training import train_state
    from spell_core.distributed.process_groups import agreed
    from spell_core.common.guards import NonFiniteUpdatesError
    from spell_core.selfplay.loop import StepAbandoned

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
                with trainer.sampling_phase():
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
    with trainer.sampling_phase() as offload:  # --offload-while-sampling: AdamW state in host memory meanwhile
        result = play.step()
    monitor.log_questions(number, result.questions)
    metrics = dict(result.metrics) | offload
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


class StopFlag:
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
