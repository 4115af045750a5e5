"""The optimizer step: trajectories -> packed micro-batches -> PPO-clip policy loss -> AdamW.

    trainer = Trainer(model, TrainerOptions(lr=2e-6, micro_batch_tokens=32768))
    metrics = trainer.train_step(trajectories)   # one optimizer step

Packing. Trajectories with identical prompt_ids (the G answers to one question, the G
verdicts on one answer) form one shared-prefix unit [prompt, resp_1, ..., resp_k]: the
prompt is forwarded and back-propagated once (`spell_kernels.shared_prefix`). A trajectory
whose prompt nobody shares is a plain sequence [prompt + resp]. Units go to micro-batches
of at most `micro_batch_tokens` tokens (`partition_by_token_budget`); a unit is never cut
inside a sequence. A group too large for one micro-batch is split into several units, each
repeating the prompt with a share of the responses (still exact: the prompt's gradient is
then summed over the pieces); only a single prompt + response longer than the budget is an
error. Only response tokens train: the hidden row that predicts response token j is the
row before it, which for j = 0 in a group is the prompt's last row, shared by every
response of the group (gathering it k times makes autograd sum its k gradients).

One step = gradient accumulation over the micro-batches, each token weighted by
`TrainerOptions.agg` (`--loss-agg`, spell_core/training/loss_weights.py): "released" (the default:
the released trainer's per-micro-batch token-means, rebuilt independently of our own
micro-batches), "token-mean" (`global_count` = every response token of the step: one mean
over all roles' tokens together) or "seq-mean-token-mean", exact across micro-batches;
global L2 gradient clipping, AdamW. A non-finite loss or gradient
skips the update, an update that leaves a weight non-finite is rolled back (spell_core/common/guards.py;
both reported in the metrics). CUDA runs the decoder under bf16 autocast (the
log-probs in the LM head's dtype); CPU runs in the model's dtype.

Precision. A model loaded in bf16 / fp16 (the checkpoint's dtype on CUDA) computes in it, but
AdamW steps fp32 master copies of its weights with fp32 moments, gradients summed in fp32, and
the model's weights are then the rounded master weights (spell_core/training/master_weights.py says why
this layout, and what it costs); updates far below half a bf16 ulp add up instead of rounding away.
Under FSDP2 the same holds through MixedPrecisionPolicy: fp32 shards, bf16 gathered for compute.

Routing replay (mixture-of-experts models, `TrainerOptions.routing_replay`, on by default): every
MoE layer uses the experts the sampler chose for each token (`Trajectory.routing`, packed beside
the tokens, spell_core/models/routed_tokens.py) while its gate weights come from the live router,
so the log-probs are the sampler's function of the weights and the router keeps learning. A
trajectory without a record, or whose record does not fit its tokens, is an error.

Many ranks (`Trainer(model, options, topology)`, see spell_core/distributed/process_groups.py): the model is
sharded with FSDP2 over the world, `global_count` is summed over the data-parallel ranks, and
with cp > 1 every micro-batch is split zigzag across the context-parallel group, a shared
prompt's shards forwarded once (`micro_batch_tokens` then counts each rank's share:
spell_core/distributed/context_parallel.py). Loss, gradients and update equal the single-process step on
the union of the ranks' trajectories (spell_core/distributed/sharded_training.py, tests/core/test_distributed.py).
"""
from __future__ import annotations

import gc
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

import spell_kernels
from spell_core.distributed import context_parallel
from spell_core.selfplay.batch import ROLES, Trajectory
from spell_core.distributed.process_groups import all_reduce_sum
from spell_core.training.master_weights import MasterWeights
from spell_core.training.offload import OFFLOAD_LEVELS, offload_while_sampling
from spell_core.models.routed_tokens import RoutedTokens, RoutingRecordError, as_replay, expert_load_metrics, \
    moe_layers, packed_rows
from spell_core.models.model import CausalLM, VarlenCausalAttention
from spell_core.distributed.sharded_training import forward_backward, shard_model
from spell_kernels.shared_prefix import SharedPrefixAttention, SharedPrefixLayout

__all__ = ["TrainerOptions", "Trainer", "MicroBatch", "TrainingOutOfMemoryError", "plan_micro_batches"]


@dataclass
class TrainerOptions:
    """SPEC.md's defaults ("Advantages and objective")."""
    lr: float = 2e-6  # constant: no schedule
    weight_decay: float = 0.01  # on every parameter
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global L2 norm of the gradient; None: no clipping
    clip_low: float = 0.2  # ratio clip 1 - 0.2 .. 1 + 0.2 (the released scripts)
    clip_high: float = 0.2
    dual_clip: float | None = 3.0  # for A < 0 the loss is at most -A * 3 (dual clip); None: off
    # --loss-agg: released | token-mean | seq-mean-token-mean (spell_core/training/loss_weights.py);
    # None: released on one process, token-mean on several ranks or with cp (released is one-process only)
    agg: str | None = None
    temperature: float = 0.7  # the sampling temperature: log-probs are scored at the one they were sampled at
    micro_batch_tokens: int = 32768  # packed tokens per forward/backward pass
    gradient_checkpointing: bool = False
    use_sampler_logprobs: bool = True  # False: old log-probs = current ones (ratio exactly 1)
    shared_prefix: bool = True  # False: every trajectory its own [prompt + resp] (the slow baseline)
    # --[no-]routing-replay: MoE layers use the sampler's expert ids (Trajectory.routing); None: on for an
    # MoE model (dense models have nothing to replay)
    routing_replay: bool | None = None
    entropy: bool = False  # also report the mean entropy of the trained tokens
    bf16_autocast: bool | None = None  # run the decoder under bf16 autocast; None: on CUDA only
    # roll back an update that leaves a weight NaN/Inf (spell_core/common/guards.py); stop after this many in a row
    max_rollbacks: int | None = 3  # None: no check (no CPU copy of the weights and optimizer state per step)
    # keep that copy to roll back to; None: on CUDA (pinned host memory), not on a CPU (it would add 3x
    # the weights to host memory: 7.5 GB for the 0.5B default); without it a NaN/Inf update stops the run
    rollback_snapshot: bool | None = None
    # what waits in host memory while the sampler runs (Trainer.sampling_phase, spell_core/training/offload.py):
    # "off", "moments" (AdamW's), or "all" (the moments and the fp32 weights the sampler does not read)
    offload_while_sampling: str = "off"


class TrainingOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """The GPU ran out of memory during a train step; the message names the knobs to turn."""


# --- packing ------------------------------------------------------------------------------------

@dataclass
class _Unit:
    """One shared-prefix group (shared=True) or one plain [prompt + response] sequence."""
    prompt: list[int]
    members: list[int]  # trajectory indices
    shared: bool
    num_tokens: int


@dataclass
class MicroBatch:
    """One packed forward/backward pass. Rows of the gathered tensors (pred_rows, targets, ...)
    are the response tokens, trajectory after trajectory (resp_cu_seqlens)."""
    input_ids: torch.Tensor  # (T,) packed tokens
    layout: SharedPrefixLayout  # segments, parents and positions of input_ids
    pred_rows: torch.Tensor  # (N,) hidden row that predicts each response token
    targets: torch.Tensor  # (N,) the response tokens
    old_logprobs: torch.Tensor  # (N,) the sampler's log-probs
    advantages: torch.Tensor  # (N,)
    resp_cu_seqlens: torch.Tensor  # (B+1,) int32: each trajectory's rows among the N
    trajectories: list[int]  # indices into the step's trajectory list, in row order
    routing: torch.Tensor | None = None  # (T, L, k) the sampler's expert ids of input_ids (routing replay)

    @property
    def has_groups(self) -> bool:
        return bool((self.layout.parent >= 0).any())


def _units(trajectories: list[Trajectory], shared_prefix: bool, budget: int) -> list[_Unit]:
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(trajectories):
        if not t.response_ids:
            continue  # nothing to train
        if not t.prompt_ids:
            raise ValueError(f"trajectory {i} ({t.role}) has an empty prompt: its first response token has no "
                             "position to be predicted from; every prompt needs at least one token")
        if t.num_tokens > budget:
            raise ValueError(
                f"trajectory {i} ({t.role}, group {t.group!r}) has {len(t.prompt_ids)} prompt + "
                f"{len(t.response_ids)} response = {t.num_tokens} tokens, more than micro_batch_tokens={budget}: "
                f"raise --micro-batch-tokens (TrainerOptions.micro_batch_tokens) to at least {t.num_tokens}, "
                "or lower --ctx / --max-new-tokens")
        key = tuple(t.prompt_ids) if shared_prefix else (i,)
        by_prompt.setdefault(key, []).append(i)
    units = []
    for members in by_prompt.values():
        prompt = trajectories[members[0]].prompt_ids
        # fill pieces of at most `budget` tokens, each [prompt, some responses]
        piece, size = [], len(prompt)
        for i in members:
            r = len(trajectories[i].response_ids)
            if piece and size + r > budget:
                units.append(_Unit(prompt, piece, len(piece) > 1, size))
                piece, size = [], len(prompt)
            piece.append(i)
            size += r
        units.append(_Unit(prompt, piece, len(piece) > 1, size))
    return units


def _build(units: list[_Unit], trajectories: list[Trajectory], device, routing: tuple | None = None) -> MicroBatch:
    ids: list[int] = []
    lengths: list[int] = []
    parents: list[int] = []
    pred_rows: list[int] = []
    order: list[int] = []
    for u in units:
        p = len(u.prompt)
        if u.shared:
            prefix_segment = len(lengths)
            lengths.append(p)
            parents.append(-1)
            ids += u.prompt
            last_prompt_row = len(ids) - 1
            for i in u.members:
                resp = trajectories[i].response_ids
                lengths.append(len(resp))
                parents.append(prefix_segment)
                pred_rows.append(last_prompt_row)
                pred_rows += range(len(ids), len(ids) + len(resp) - 1)
                ids += resp
                order.append(i)
        else:
            (i,) = u.members
            resp = trajectories[i].response_ids
            lengths.append(p + len(resp))
            parents.append(-1)
            pred_rows += range(len(ids) + p - 1, len(ids) + p - 1 + len(resp))
            ids += u.prompt
            ids += resp
            order.append(i)
    resp_lengths = [len(trajectories[i].response_ids) for i in order]
    resp_cu = spell_kernels.cu_seqlens_from_lengths(torch.tensor(resp_lengths, dtype=torch.long))
    rows = None
    if routing is not None:
        rows = torch.cat([r for u in units for r in _unit_routing(u, trajectories, *routing)]).to(device)
    advantages = torch.tensor([float(trajectories[i].advantage) for i in order], dtype=torch.float64)
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        layout=SharedPrefixLayout.from_segments(lengths, parents, device=device),
        pred_rows=torch.tensor(pred_rows, dtype=torch.long, device=device),
        targets=torch.tensor([tok for i in order for tok in trajectories[i].response_ids], dtype=torch.long,
                             device=device),
        old_logprobs=torch.tensor([lp for i in order for lp in trajectories[i].old_logprobs], dtype=torch.float64,
                                  device=device),
        advantages=spell_kernels.broadcast_to_tokens(advantages, resp_cu).to(device),
        resp_cu_seqlens=resp_cu.to(device),
        trajectories=order,
        routing=rows,
    )


def _unit_routing(unit: _Unit, trajectories: list[Trajectory], layers: tuple[int, ...], k: int) -> list:
    """The expert-id rows of one unit in its packed order; the prompt's come from its first member."""
    records = []
    for i in unit.members:
        t = trajectories[i]
        what = f"trajectory {i} ({t.role}, group {t.group!r})"
        if not isinstance(t.routing, RoutedTokens):
            raise RoutingRecordError(
                f"{what} has no expert record: the model is a mixture of experts and routing replay is on, so "
                "every trajectory needs the experts its sampler chose (spell_core.sampling.sampler.generate "
                "returns them as Completion.routing); sample again, or train without replay "
                "(--no-routing-replay, TrainerOptions.routing_replay=False)")
        t.routing.check(len(t.prompt_ids), len(t.response_ids), layers, k, what)
        records.append(t.routing)
    return packed_rows(records[0].prompt, [r.response for r in records],
                       [len(trajectories[i].response_ids) for i in unit.members])


def plan_micro_batches(trajectories: list[Trajectory], micro_batch_tokens: int, shared_prefix: bool = True,
                       device=None, quadratic_weight: float | None = None,
                       routing: tuple[tuple[int, ...], int] | None = None) -> list[MicroBatch]:
    """Pack the trajectories that have response tokens into balanced micro-batches of at most
    `micro_batch_tokens` packed tokens (see the module docstring). routing: (MoE layers,
    experts per token) to pack the trajectories' expert records beside their tokens (replay)."""
    if not micro_batch_tokens >= 1:
        raise ValueError(f"micro_batch_tokens must be a positive number of tokens, got {micro_batch_tokens}")
    units = _units(trajectories, shared_prefix, micro_batch_tokens)
    kwargs = {} if quadratic_weight is None else {"quadratic_weight": quadratic_weight}
    bins = spell_kernels.partition_by_token_budget([u.num_tokens for u in units], micro_batch_tokens, **kwargs)
    return [_build([units[j] for j in b], trajectories, device, routing) for b in bins if b]


# --- the optimizer step -------------------------------------------------------------------------

_OOM_ADVICE = ("the GPU ran out of memory during the training step ({detail}). Lower --micro-batch-tokens "
               "(now {budget}; a micro-batch's activations grow with it), turn on gradient checkpointing "
               "(TrainerOptions.gradient_checkpointing), or shorten the sequences with --ctx and --max-new-tokens.")


class Trainer:
    """Owns the optimizer of `model`; the sampler keeps using the same model object, so each
    step's update is what the next step samples from."""

    def __init__(self, model: CausalLM, options: TrainerOptions | None = None, topology=None):
        self.model = model
        self.options = options = options or TrainerOptions()
        self.topology = topology  # spell_core.distributed.process_groups.Topology; None: one process
        self._distributed = topology is not None and topology.is_distributed
        self._cp = topology.cp if topology is not None else 1
        if self._distributed:
            shard_model(model, topology)  # before the optimizer: it must hold the sharded parameters
        if options.agg is None:
            options = self.options = replace(options, agg="token-mean" if self._distributed or self._cp > 1
                                             else "released")
        if options.agg not in ("released", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            raise ValueError(f"agg={options.agg!r} (--loss-agg): expected released, token-mean, seq-mean-token-mean "
                             "or seq-mean-token-sum")
        if options.agg == "released" and (self._distributed or self._cp > 1):
            raise ValueError("--loss-agg released is implemented for one process; with several ranks or --cp use "
                             "--loss-agg token-mean or seq-mean-token-mean")
        if options.offload_while_sampling not in OFFLOAD_LEVELS:
            raise ValueError(f"offload_while_sampling={options.offload_while_sampling!r} (--offload-while-sampling): "
                             f"expected one of {', '.join(OFFLOAD_LEVELS)}")
        if not options.temperature > 0:
            raise ValueError(f"temperature must be > 0 (the sampling temperature), got {options.temperature}")
        model.gradient_checkpointing = options.gradient_checkpointing
        self.moe_layers = moe_layers(model.config)
        # (MoE layers, experts per token) when the sampler's expert ids are replayed; None: live routing
        self.replay = ((self.moe_layers, model.config.num_experts_per_tok)
                       if self.moe_layers and options.routing_replay is not False else None)
        model_params = [p for p in model.parameters() if p.requires_grad]
        if not model_params:
            raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
        self.master = MasterWeights(model_params)
        if self.master.active:  # weights loaded into the model (a resume) are the master weights again
            model.register_load_state_dict_post_hook(lambda module, keys: self.master.refresh_from_model())
        self.params = self.master.params  # what the optimizer steps: fp32
        on_cuda = all(p.is_cuda for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=options.lr, betas=tuple(options.betas), eps=options.eps,
                                           weight_decay=options.weight_decay, fused=True if on_cuda else None)
        self.device = self.params[0].device
        self.guard = None
        if options.max_rollbacks is not None:
            from spell_core.common.guards import UpdateGuard
            every_rank = None
            if self._distributed:
                from spell_core.distributed.process_groups import all_reduce_sum
                every_rank = lambda ok: all_reduce_sum(0.0 if ok else 1.0, topology) == 0  # noqa: E731
            keep = on_cuda if options.rollback_snapshot is None else options.rollback_snapshot
            self.guard = UpdateGuard(self.params, self.optimizer, options.max_rollbacks, every_rank, keep_snapshot=keep)
        autocast = options.bf16_autocast
        self.autocast = self.device.type == "cuda" if autocast is None else bool(autocast)
        # attention's share of a micro-batch's cost, for balancing (see spell_kernels.packing)
        self.quadratic_weight = 1.0 / (12 * model.config.hidden_size)

    def sampling_phase(self):
        """A context for sampling between updates: with `offload_while_sampling` on, the optimizer
        state (and the fp32 weights) wait in host memory inside it; it yields a dict of the bytes
        moved and the seconds spent, filled when the block ends. Collective on several ranks."""
        return offload_while_sampling(self, self.options.offload_while_sampling)

    def train_step(self, trajectories: list[Trajectory]) -> dict:
        """One optimizer step on all `trajectories`; returns the step's metrics (plain numbers)."""
        start = time.perf_counter()
        if self.topology is not None:
            self.topology.mark("train step")
        self._zero_grad()
        expert_load_metrics(self.model)  # from here on, the counts are this step's forwards'
        metrics = self.accumulate_gradients(trajectories)
        metrics.update(expert_load_metrics(self.model))
        self.master.take_gradients()
        if not metrics["skipped"]:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if not math.isfinite(metrics["grad_norm"]):
                metrics.update(skipped=True, skip_reason="non-finite gradient (NaN/Inf): update skipped")
            else:
                if self.options.grad_clip:
                    torch.nn.utils.clip_grads_with_norm_(self.params, self.options.grad_clip, norm)
                if self.guard is not None:
                    self.guard.snapshot()
                self.optimizer.step()
                if self.guard is not None and not self.guard.check():  # raises after max_rollbacks in a row
                    metrics.update(skipped=True, rolled_back=True,
                                   skip_reason="non-finite weights after the update (NaN/Inf): rolled back to "
                                               "the weights and optimizer state before it")
                self.master.copy_to_model()  # after the check: a raised check leaves the model's weights as they were
        self._zero_grad()
        metrics.setdefault("grad_norm", None)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["step_time_s"] = time.perf_counter() - start
        return metrics

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.master.zero_grad()

    def accumulate_gradients(self, trajectories: list[Trajectory]) -> dict:
        """Forward and backward every micro-batch, adding into .grad (no optimizer step).
        Returns the metrics of train_step except grad_norm, lr and step_time_s."""
        opts = self.options
        # under context parallelism a micro-batch is split over cp ranks
        micro_batches = plan_micro_batches(trajectories, opts.micro_batch_tokens * self._cp, opts.shared_prefix,
                                           self.device, self.quadratic_weight, self.replay)
        self._check_token_ids(trajectories, micro_batches)
        metrics = _count_metrics(trajectories, micro_batches)
        self._released_weights = None
        if opts.agg == "released":
            from spell_core.training import loss_weights
            self._released_weights = torch.tensor(loss_weights.trajectory_token_weights(
                [len(t.prompt_ids) for t in trajectories], [len(t.response_ids) for t in trajectories], "released",
                loss_weights.RELEASED_MAX_TOKEN_LEN), dtype=torch.float64)
            global_count = 1  # not used: the weights are explicit
        elif opts.agg == "token-mean":
            global_count = metrics["tokens_trained"]
        else:
            global_count = sum(len(mb.trajectories) for mb in micro_batches)
        if self._distributed:  # the CP ranks of a data-parallel group share their trajectories: count them once
            global_count = round(all_reduce_sum(global_count, self.topology, self.topology.dp_group))
        if not micro_batches and not (self._distributed and global_count > 0):
            return metrics | {"skipped": True, "skip_reason": "nothing trainable: no trajectory with response tokens",
                              "loss": 0.0}
        self.model.train()
        oom_detail = None
        try:
            loss, stats, finite = self._forward_backward(micro_batches, global_count)
        except torch.cuda.OutOfMemoryError as err:
            oom_detail = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
        if oom_detail is not None:  # outside the except block: the traceback no longer pins the activations
            self._zero_grad()
            gc.collect()
            torch.cuda.empty_cache()
            raise TrainingOutOfMemoryError(_OOM_ADVICE.format(detail=oom_detail, budget=opts.micro_batch_tokens))
        metrics.update(_combine_stats(stats))
        metrics["loss"] = loss
        if finite:
            return metrics | {"skipped": False, "skip_reason": None}
        self._zero_grad()
        return metrics | {"skipped": True, "skip_reason": "non-finite loss (NaN/Inf): update skipped"}

    def _forward_backward(self, micro_batches: list[MicroBatch], global_count: int):
        if self._distributed:
            return forward_backward(self, micro_batches, global_count)
        total, stats = 0.0, []
        for mb in micro_batches:
            loss, mb_stats = self._micro_batch_loss(mb, global_count)
            value = float(loss.detach())
            if not math.isfinite(value):
                return value, stats, False  # the other micro-batches cannot make this step usable
            loss.backward()
            total += value
            stats.append(mb_stats)
        return total, stats, True

    def padding_micro_batch(self) -> MicroBatch:
        """A micro-batch with an exactly zero gradient (advantage 0), for a rank with fewer
        micro-batches than the busiest one (sharded_training.forward_backward)."""
        ghost = Trajectory("questioner", [0], [0], [0.0], 0.0)
        if self.replay is not None:
            layers, k = self.replay
            ghost.routing = RoutedTokens(torch.arange(k, dtype=torch.uint8).expand(1, len(layers), k),
                                         torch.zeros((0, len(layers), k), dtype=torch.uint8))
        return plan_micro_batches([ghost], 1 << 30, False, self.device, routing=self.replay)[0]

    def _micro_batch_loss(self, mb: MicroBatch, global_count: int):
        """(loss, stats) of one micro-batch, before backward."""
        opts = self.options
        if self._cp > 1:
            return context_parallel.micro_batch_loss(self, mb, global_count)
        if mb.has_groups:
            attn = SharedPrefixAttention(mb.layout)
        else:
            attn = VarlenCausalAttention(mb.layout.cu_seqlens, mb.layout.max_seqlen)
        context = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        replay = {} if mb.routing is None else {"routing": as_replay(mb.routing, self.moe_layers)}
        with context:
            hidden = self.model.forward_hidden(mb.input_ids, mb.layout.cu_seqlens, mb.layout.position_ids,
                                               attn=attn, **replay)
        weight = self.model.lm_head_weight
        advantages, agg = mb.advantages, opts.agg
        if opts.agg == "released":
            # w_t folded into the advantages (the PPO-clip loss is positively homogeneous in A), summed
            # with global_count 1: loss = sum_t w_t loss_t, as context_parallel does for seq-mean
            lengths = (mb.resp_cu_seqlens[1:] - mb.resp_cu_seqlens[:-1]).long().cpu()
            weights = torch.repeat_interleave(self._released_weights[mb.trajectories], lengths)
            advantages, agg = mb.advantages * weights.to(mb.advantages.device, mb.advantages.dtype), "token-mean"
        # log-probs in the head's own precision, outside autocast: the PPO ratio compares them with
        # the sampler's, and bf16 logits (3 significant digits) would move it by a good part of the clip
        loss, mb_stats = spell_kernels.policy_loss(
            hidden[mb.pred_rows].to(weight.dtype), weight, mb.targets,
            mb.old_logprobs if opts.use_sampler_logprobs else None, advantages,
            torch.ones_like(mb.targets, dtype=torch.bool), clip_low=opts.clip_low, clip_high=opts.clip_high,
            dual_clip=opts.dual_clip, agg=agg, temperature=opts.temperature,
            return_entropy=opts.entropy, cu_seqlens=mb.resp_cu_seqlens, global_count=global_count)
        return loss, mb_stats

    def _check_token_ids(self, trajectories: list[Trajectory], micro_batches: list[MicroBatch]) -> None:
        vocab = self.model.config.vocab_size
        if all(0 <= int(mb.input_ids.min()) and int(mb.input_ids.max()) < vocab for mb in micro_batches):
            return
        for i, t in enumerate(trajectories):
            for what, ids in (("prompt_ids", t.prompt_ids), ("response_ids", t.response_ids)):
                if ids and not 0 <= min(ids) <= max(ids) < vocab:
                    bad = next(x for x in ids if not 0 <= x < vocab)
                    raise ValueError(f"trajectory {i} ({t.role}): {what} holds token id {bad}, outside the model's "
                                     f"vocabulary [0, {vocab}); was it tokenized for another model?")


def _count_metrics(trajectories: list[Trajectory], micro_batches: list[MicroBatch]) -> dict:
    metrics = {"trajectories": len(trajectories), "micro_batches": len(micro_batches),
               "tokens_trained": sum(len(t.response_ids) for t in trajectories),
               "tokens_forwarded": sum(mb.layout.num_tokens for mb in micro_batches)}
    for role in ROLES:
        metrics[f"tokens_{role}"] = sum(len(t.response_ids) for t in trajectories if t.role == role)
    return metrics


def _combine_stats(stats: list[dict]) -> dict:
    """One step's policy-loss statistics from the micro-batches' (token-weighted means, min/max)."""
    if not stats:
        return {}
    counts = torch.stack([s["num_tokens"] for s in stats])
    out = {}
    for key in stats[0]:
        values = torch.stack([s[key] for s in stats])
        if key == "num_tokens":
            continue
        if key in ("ratio_min", "ratio_max"):  # a micro-batch without tokens reports 1: not a real extreme
            values = values[counts > 0] if bool((counts > 0).any()) else values
            out[key] = values.min() if key == "ratio_min" else values.max()
        else:
            out[key] = (values * counts).sum() / counts.sum().clamp(min=1.0)
    return {k: float(v) for k, v in out.items()}
