"""`python -m spell_core.plan`: will a model fit, per GPU, at a context length, CP size and
micro-batch, before anything is loaded? Reads the model's config.json only.

    python -m spell_core.plan --model Qwen/Qwen3-8B --ctx 128k --gpus 8 --cp 4 --gpu-memory 80GB

Per GPU, two phases that never overlap:

  training   FSDP2 shards of the weights, gradients and AdamW's two moments (over all GPUs),
             plus the unsharded working set (the root's embedding / head, two decoder layers in
             flight), plus one micro-batch's activations: every tensor autograd keeps per token
             and layer (counted from the model code: the RMSNorms' fp32 copies, q/k/v after
             RoPE, the attention output and its LSE, the MLP's four I-wide tensors), or with
             gradient checkpointing one layer input per layer and one layer recomputed, plus
             what is live beside them at the moment the peak falls (`activation_peaks`: the
             loss's logits chunk, a norm's or the MLP's backward temporaries, the head's
             gradient). Under CP a rank holds micro_batch_tokens tokens of the step (its share);
             the model's parameter dtype is used for compute (bf16 on GPU); a half-precision
             model trains fp32 master weights: FSDP2 shards them in fp32 and gathers bf16
             (MixedPrecisionPolicy), one process keeps the bf16 model plus an fp32 copy; the
             gradients AdamW reads and its two moments are fp32 (spell_core/master_weights.py).
             A mixture-of-experts layer (qwen3_moe) holds all its experts in each shard and in
             the gathered layer; per token it keeps the router's fp32 probabilities and top-k,
             and per routed row (k per token) the experts' gate/up and SwiGLU outputs
             (`Shape.moe_saved_bytes_per_token`); the micro-batch's routing record is replayed.
  sampling   every rank gathers the full weights (once per step) beside what stays resident of
             training: the fp32 weight shard (one process: the fp32 master copy) and AdamW's
             moments; the gradients are freed after each update. It runs whole prompts: the KV
             cache of one question's group, prompt + G x max_new_tokens tokens (the prompt's KV
             is shared by the G samples), one prefill chunk's working set, and for a MoE model
             the group's routing record (k expert ids per token and MoE layer). When that does
             not fit, the plan moves what the sampler does not read to host memory while it
             samples (the moments, then the fp32 shard) and says so: `run` does the same
             (--offload-while-sampling, spell_core/training/offload.py).
  host       per GPU process: the update guard's pinned copy of the fp32 weights and moments
             (spell_core/common/guards.py, on by default on GPUs), what is moved while sampling,
             and the routing record of the step's trained groups (beside their trajectories).

Everything is linear in the context: no term holds an (L x L) matrix. No activation term is
calibrated: each is counted from the code, and the activation model is checked against the
live tensor bytes and the resident set of CPU train steps in bench/results/plan.md.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


__all__ = ["MemoryPlan", "plan_memory", "read_model_config", "parse_bytes", "main"]

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
USABLE = 0.92  # of the GPU's memory: CUDA context, allocator fragmentation, NCCL buffers
PREFILL_CHUNK_TOKENS = 8192  # the sampler's default on CUDA (sampler.DEFAULT_PREFILL_CHUNK_TOKENS)
LOGITS_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}  # fused log-prob's logits buffer (spell_kernels/logprob.py)


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclass
class Shape:
    """What the memory of a decoder depends on (from config.json). A mixture-of-experts model
    (qwen3_moe) has `experts` experts of intermediate size `moe_intermediate` in the layers
    `moe_layers`, `experts_per_token` of them per token; its other layers are dense (intermediate)."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qk_norm: bool
    qkv_bias: bool
    max_positions: int
    dtype: str
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    moe_layers: tuple = ()

    @classmethod
    def from_config(cls, raw: dict, dtype: str | None = None, source: str = "config.json") -> "Shape":
        from spell_core.models.model import ModelConfig

        moe = raw.get("model_type") == "qwen3_moe"
        if moe:  # attention, norms and the root are Qwen3's: read them as a Qwen3 config
            as_qwen3 = dict(raw, model_type="qwen3", architectures=[])
            moe_layers = _moe_layer_indices(raw, source)
            if "intermediate_size" not in raw and len(moe_layers) == raw["num_hidden_layers"]:
                as_qwen3["intermediate_size"] = 0  # no dense layer needs it
            config = ModelConfig.from_hf(as_qwen3, source)
        else:
            config = ModelConfig.from_hf(raw, source)
        name = dtype or raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if name not in DTYPE_BYTES:
            raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPE_BYTES)}")
        shape = cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                    config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                    config.tie_word_embeddings, config.qk_norm, config.qkv_bias, config.max_position_embeddings, name)
        if moe:
            shape.experts, shape.experts_per_token = raw["num_experts"], raw["num_experts_per_tok"]
            shape.moe_intermediate, shape.moe_layers = raw["moe_intermediate_size"], moe_layers
        return shape

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def attention_params(self) -> int:
        """A layer's attention, its two RMSNorms and (Qwen3) its q/k norms."""
        h, d, q, kv = self.hidden, self.head_dim, self.heads, self.kv_heads
        attn = h * q * d + 2 * h * kv * d + q * d * h + (q * d + 2 * kv * d if self.qkv_bias else 0)
        return attn + 2 * h + (2 * d if self.qk_norm else 0)

    def expert_params(self) -> int:
        """One MoE layer's experts, all of them: gate, up (2 Im x H) and down (H x Im) each."""
        return self.experts * 3 * self.hidden * self.moe_intermediate

    def layer_params(self, moe: bool | None = None) -> int:
        """One decoder layer: a dense one (moe False), a MoE one (router E x H and all experts), or
        by default the larger kind the model has (FSDP2 gathers a whole layer, every expert in it)."""
        dense = self.attention_params() + 3 * self.hidden * self.intermediate
        sparse = self.attention_params() + self.experts * self.hidden + self.expert_params()
        if moe is None:
            kinds = ([sparse] if self.moe_layers else []) + ([dense] if len(self.moe_layers) < self.layers else [])
            return max(kinds)
        return sparse if moe else dense

    def layer_kinds(self) -> list[bool]:
        """For each layer from the first: True when it is a MoE layer."""
        moe = set(self.moe_layers)
        return [i in moe for i in range(self.layers)]

    def root_params(self) -> int:
        """Embedding, final norm and (untied) head: FSDP2's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return sum(self.layer_params(kind) for kind in self.layer_kinds()) + self.root_params()

    def active_params(self) -> int:
        """Parameters one token computes with: every expert but the k it is routed to left out."""
        unused = (self.experts - self.experts_per_token) * 3 * self.hidden * self.moe_intermediate
        return self.params() - len(self.moe_layers) * unused

    @property
    def routing_id_bytes(self) -> int:
        """Bytes of one recorded expert id (spell_core/models/routing.py: uint8 up to 256 experts)."""
        return 1 if self.experts <= 256 else 2 if self.experts <= 32768 else 4

    def routing_record_bytes_per_token(self) -> int:
        """The sampler's record of one token's experts: k ids in every MoE layer."""
        return len(self.moe_layers) * self.experts_per_token * self.routing_id_bytes

    @property
    def fp32_copy_bytes(self) -> int:
        """Bytes per element of the fp32 copies RMSNorm makes (x.float(): no copy when fp32 already)."""
        return max(4, self.bytes)

    def moe_saved_bytes_per_token(self, device: str = "cuda") -> int:
        """What autograd keeps per token in one MoE FFN (the router as transformers' Qwen3-MoE:
        linear, fp32 softmax over all E experts, top-k, renormalised): the fp32 probabilities 4 E,
        the top-k ids 8 k (int64) and fp32 weights 4 k and their sum 4; then per routed row (k per
        token): on CUDA the grouped GEMM's gate/up output 2 Im and SwiGLU output Im (b each), the
        row's weight b and its place in the expert-sorted order 8 (int64); on CPU the loop over
        experts (spell_kernels/moe.py) keeps the gathered input, the down projection's output and
        one more H-wide row 3 b H, gate/up, silu(gate) and their product 4 b Im, the row's weight b
        and its token and slot indices 16 (measured: tests/core/test_plan_moe.py)."""
        b, k, im, h = self.bytes, self.experts_per_token, self.moe_intermediate, self.hidden
        router = 4 * self.experts + 12 * k + 4
        row = b * 3 * im + b + 8 if device == "cuda" else 3 * b * h + 4 * b * im + b + 16
        return router + k * row

    def activation_bytes_per_token_layer(self, moe: bool = False, device: str = "cuda") -> int:
        """What autograd keeps per token in one decoder layer (spell_core/models/model.py): each RMSNorm
        its fp32 input and normalised output (4 + b) H plus its output b H; q and k after RoPE,
        v, the attention output (b each) and its fp32 LSE; gate, silu(gate), up and their
        product (b I each), or in a MoE layer `moe_saved_bytes_per_token`; with q/k norm their
        fp32 inputs and outputs."""
        b, h, d = self.bytes, self.hidden, self.head_dim
        norm = self.fp32_copy_bytes * h + 2 * b * h
        attn = b * (2 * self.heads * d + 2 * self.kv_heads * d) + 4 * self.heads
        qk_norm = (self.fp32_copy_bytes + b) * (self.heads + self.kv_heads) * d if self.qk_norm else 0
        mlp = self.moe_saved_bytes_per_token(device) if moe else 4 * b * self.intermediate
        return 2 * norm + attn + qk_norm + mlp


def _moe_layer_indices(raw: dict, source: str) -> tuple:
    """The layers of a qwen3_moe config with a sparse MLP (transformers' Qwen3MoeDecoderLayer):
    not in mlp_only_layers, and (index + 1) a multiple of decoder_sparse_step."""
    missing = [name for name in MOE_FIELDS if name not in raw]
    if missing:
        raise ValueError(f"{source}: model_type 'qwen3_moe' needs {', '.join(missing)} (the number of experts, "
                         "experts per token and each expert's intermediate size); copy them from the model's "
                         "published config.json")
    for name in MOE_FIELDS + ("num_hidden_layers",):
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: {name} must be a whole number of at least 1, got {value!r}")
    if raw["num_experts_per_tok"] > raw["num_experts"]:
        raise ValueError(f"{source}: num_experts_per_tok ({raw['num_experts_per_tok']}) is more than num_experts "
                         f"({raw['num_experts']})")
    step = raw.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"{source}: decoder_sparse_step must be a whole number of at least 1, got {step!r}")
    dense = raw.get("mlp_only_layers") or []
    layers = raw["num_hidden_layers"]
    if not isinstance(dense, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in dense):
        raise ValueError(f"{source}: mlp_only_layers must be a list of layer indices from 0 to {layers - 1}, "
                         f"got {dense!r}")
    return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)


@dataclass
class MemoryPlan:
    """Bytes per GPU of every part, the two phases' peaks, and the verdict."""
    shape: Shape
    ctx: int
    gpus: int
    cp: int
    gpu_memory: int
    micro_batch_tokens: int
    gradient_checkpointing: bool
    group_size: int
    max_new_tokens: int
    parts: dict = field(default_factory=dict)
    training_peak: int = 0
    sampling_peak: int = 0
    advice: list = field(default_factory=list)
    gpus_per_node: int = 1
    host_parts: dict = field(default_factory=dict)  # host memory per GPU process
    offloaded: list = field(default_factory=list)  # parts moved to host memory while sampling

    @property
    def host_bytes(self) -> int:
        return sum(self.host_parts.values())

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * USABLE)

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.sampling_peak)

    @property
    def headroom(self) -> int:
        return self.usable - self.peak

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def report(self) -> str:
        s = self.shape
        if s.is_moe:
            model = (f"model       {s.params() / 1e9:.2f} B parameters, {s.active_params() / 1e9:.2f} B active per "
                     f"token ({s.layers} layers, {len(s.moe_layers)} MoE: {s.experts} experts x intermediate "
                     f"{s.moe_intermediate}, {s.experts_per_token} per token; hidden {s.hidden}, {s.heads} q / "
                     f"{s.kv_heads} kv heads x {s.head_dim}, vocab {s.vocab}, {s.dtype})")
        else:
            model = (f"model       {s.params() / 1e9:.2f} B parameters ({s.layers} layers, hidden {s.hidden}, "
                     f"{s.heads} q / {s.kv_heads} kv heads x {s.head_dim}, intermediate {s.intermediate}, "
                     f"vocab {s.vocab}, {s.dtype})")
        lines = [model]
        if s.is_moe:
            lines.append(f"experts     {len(s.moe_layers) * s.expert_params() / 1e9:.2f} B of them, all "
                         f"{s.experts} of a layer in every FSDP2 shard and gathered layer (no expert parallelism)")
        lines += [f"layout      {self.gpus} GPUs = {self.gpus // self.cp} data parallel x {self.cp} context parallel; "
                  f"ctx {self.ctx:,}; micro-batch {self.micro_batch_tokens:,} tokens per GPU"
                  f"{' (gradient checkpointing)' if self.gradient_checkpointing else ''}; "
                  f"G = {self.group_size} samples x {self.max_new_tokens:,} new tokens",
                  "per GPU:"]
        for name, value in self.parts.items():
            lines.append(f"  {name:<44} {value / GiB:8.2f} GiB")
        moved = " (offloaded)" if self.offloaded else ""
        lines += [f"  {'training peak':<44} {self.training_peak / GiB:8.2f} GiB",
                  f"  {'sampling peak' + moved:<44} {self.sampling_peak / GiB:8.2f} GiB",
                  f"  {'usable ({:.0%} of {:.0f} GiB)'.format(USABLE, self.gpu_memory / GiB):<44} "
                  f"{self.usable / GiB:8.2f} GiB",
                  f"  {'headroom':<44} {self.headroom / GiB:8.2f} GiB"]
        if self.host_parts:
            lines.append("host memory per GPU:")
            lines += [f"  {name:<44} {value / GiB:8.2f} GiB" for name, value in self.host_parts.items()]
            lines.append(f"  {f'per node of {self.gpus_per_node} GPUs':<44} "
                         f"{self.host_bytes * self.gpus_per_node / GiB:8.2f} GiB")
        lines.append(self.verdict)
        lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "fits: NO"
        return "fits: yes, with host offload while sampling (--offload-while-sampling)" if self.offloaded \
            else "fits: yes"

    def to_dict(self) -> dict:
        return {"parts_bytes": self.parts, "training_peak_bytes": self.training_peak,
                "sampling_peak_bytes": self.sampling_peak, "usable_bytes": self.usable, "headroom_bytes": self.headroom,
                "fits": self.fits, "offloaded_while_sampling": self.offloaded, "host_bytes_per_gpu": self.host_parts,
                "advice": self.advice}


def activation_peaks(shape: Shape, tokens: int, gradient_checkpointing: bool, device: str = "cuda",
                     loss_rows: int | None = None, full_gradients: bool = False,
                     gradients_held: bool = False) -> dict[str, int]:
    """Bytes live on one rank, beyond weights, gradient shards and optimizer state, at each moment
    of one micro-batch of `tokens` tokens where the peak can fall, counted from what the code
    allocates (spell_core/models/model.py, spell_kernels/policy_loss.py, spell_kernels/attn_cpu.py) and checked
    tensor by tensor against a memory timeline of a CPU step (bench/results/plan.md):

      loss (forward)        every layer's saved tensors, the final norm's, its output, the fused
                            loss's logits chunk (CPU: and a scratch chunk), its fp32 head gradient
                            and (bf16) that gradient cast to the head's dtype
      final norm (backward) the final norm's backward: 5 fp32 temporaries of the hidden size
      MLP (backward)        a layer's backward at its MLP: the residual gradient, and the gradients
                            of silu(gate) and up beside the product's (which replaced the product)
      attention (backward)  a layer's backward at its attention: d_out, fp32 dq/dk/dv accumulators
                            and the kernel's own dq/dk/dv, the MLP's tensors already freed
      end of backward       the embedding's gradient, every activation freed

    With gradient checkpointing a layer keeps only its input, and the layer being back-propagated
    holds its saved tensors again (recomputed). Gradients: FSDP2 (default) keeps the head's
    unsharded gradient for the whole backward and one layer's at a time; full_gradients (one
    process, no FSDP2) keeps every layer's as it appears; gradients_held: an earlier micro-batch
    of the step left every gradient in place (this one's are added into them)."""
    b, f, h, v = shape.bytes, shape.fp32_copy_bytes, shape.hidden, shape.vocab
    kinds = shape.layer_kinds()
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    t = tokens
    rows = tokens if loss_rows is None else loss_rows
    saved = {moe: shape.activation_bytes_per_token_layer(moe, device) for moe in (False, True)}
    rope = 2 * b * shape.head_dim * t  # cos and sin, (T, head_dim) each
    if gradient_checkpointing:
        kept = {moe: b * h * t for moe in saved}  # a layer's input, the checkpoint's only saved tensor
        # the layer in backward, recomputed: its saved tensors, less its input when x.float() is x itself
        recomputed = {moe: (saved[moe] - (b * h if b >= 4 else 0)) * t for moe in saved}
    else:
        kept, recomputed = {moe: saved[moe] * t for moe in saved}, {False: 0, True: 0}
    final_norm = (f + b) * h * t
    held = shape.params() * b if gradients_held else 0
    # the head's gradient: added into the held one at once, except that autograd sums a tied weight's
    # two gradients (head and embedding) before it accumulates: then it waits to the end of backward
    head_grad = 0 if gradients_held and not shape.tied else v * h * b
    peaks = {}
    all_kept = sum(kept[moe] for moe in kinds)

    chunk_element = b if device == "cuda" else 4  # the loss computes in fp32 on CPU (spell_kernels/logprob.py)
    chunk_rows = min(rows, max(1, LOGITS_CHUNK_BYTES[device] // (v * chunk_element)))
    chunks = chunk_rows * v * chunk_element * (1 if device == "cuda" else 2)
    # the head's gradient accumulates in fp32 and is cast to the weight's dtype at the end, both live;
    # on CPU a half-precision head and its rows are first copied to fp32
    head_copies = 4 * v * h + (b * v * h if b < 4 else 0)
    if device != "cuda" and b < 4:
        head_copies += 4 * v * h + 4 * chunk_rows * h
    peaks["loss (forward)"] = (rope + all_kept + final_norm + b * h * t + rows * h * (b + chunk_element) + chunks
                               + head_copies + held)
    peaks["final norm (backward)"] = rope + all_kept + final_norm + (5 * f - b) * h * t + head_grad + held

    peaks["MLP (backward)"] = peaks["attention (backward)"] = 0
    earlier, remaining = 0, all_kept
    for moe in reversed(kinds):  # from the last layer down
        layer_grads = shape.layer_params(moe) * b
        live = rope + remaining + recomputed[moe] + b * h * t + head_grad + held + earlier
        mlp_working, mlp_grads, mlp_saved, mlp_params = _mlp_backward(shape, moe, t, device)
        peaks["MLP (backward)"] = max(peaks["MLP (backward)"], live + mlp_working + mlp_grads)
        freed = mlp_saved + (f + 2 * b) * h * t  # the MLP's and the post-attention norm's saved tensors
        working = (b * q + 8 * (q + 2 * kv)) * t  # d_out; fp32 dq, dk, dv twice (CPU kernel; Triton: fewer)
        attn_grads = (q * h if gradients_held else mlp_params + q * h) * b  # o_proj's (and the MLP's, not yet reduced)
        peaks["attention (backward)"] = max(peaks["attention (backward)"], live - freed + working + attn_grads)
        if full_gradients and not gradients_held:
            earlier += layer_grads
        remaining -= kept[moe]
    if full_gradients or gradients_held:
        grads = shape.params() * b + (v * h * b if shape.tied or gradients_held else 0)  # + the embedding's, added
    else:
        grads = shape.root_params() * b + shape.layer_params() * b
    peaks["end of backward"] = rope + b * h * t + grads
    return peaks


def _mlp_backward(shape: Shape, moe: bool, tokens: int, device: str) -> tuple[int, int, int, int]:
    """A layer's MLP in backward: (the working set at its peak, the weight gradients then live, its
    saved tensors, its parameters). Dense: the gradients of silu(gate) and up 2 b I per token beside
    down_proj's gradient. MoE: per routed row the gradients of the SwiGLU output and of gate/up
    3 b Im, the router's fp32 gradient 4 E per token, beside every expert's down_proj gradient
    E x H x Im (all experts of the layer are in one unit)."""
    b, h, t = shape.bytes, shape.hidden, tokens
    if not moe:
        i = shape.intermediate
        return 2 * b * i * t, h * i * b, 4 * b * i * t, 3 * h * i
    im, e, k = shape.moe_intermediate, shape.experts, shape.experts_per_token
    working = (3 * b * im * k + 4 * e) * t
    return working, e * h * im * b, shape.moe_saved_bytes_per_token(device) * t, shape.expert_params() + e * h


def activations(shape: Shape, tokens: int, gradient_checkpointing: bool, device: str = "cuda",
                loss_rows: int | None = None, full_gradients: bool = False, gradients_held: bool = False) -> int:
    """Peak bytes of one micro-batch on one rank beyond weights, gradient shards and optimizer
    state: the largest of `activation_peaks`."""
    return max(activation_peaks(shape, tokens, gradient_checkpointing, device, loss_rows, full_gradients,
                                gradients_held).values())


def plan_memory(shape: Shape, ctx: int, gpus: int = 1, cp: int = 1, gpu_memory: int = 80 * GiB,
                micro_batch_tokens: int | None = None, gradient_checkpointing: bool = False, group_size: int = 8,
                max_new_tokens: int = 4096, kv_prompt_tokens: int | None = None, offload: str = "auto",
                rollback_snapshot: bool = True, trained_groups: int = 128,
                gpus_per_node: int | None = None) -> MemoryPlan:
    """ctx: the tokens of one trajectory (what training holds); kv_prompt_tokens: the prompt a
    group's G samples share in the sampler's KV cache (default ctx, the command line's reading:
    --ctx counts the prompt, the responses come on top). offload (run's --offload-while-sampling):
    "auto" moves what the sampler does not read (AdamW's moments, then the fp32 master shard) to host
    memory while it samples, as much as sampling needs to fit; "on" moves both; "off" nothing.
    rollback_snapshot: the update guard's pinned host copy of the fp32 weights and moments (a GPU
    run's default). trained_groups: the groups one step trains (SPEC: 128),
    whose routing record waits on the host beside the trajectories."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload {offload!r} (--offload-while-sampling): expected one of "
                         f"{', '.join(OFFLOAD_CHOICES)}")
    if gpus < 1 or cp < 1 or gpus % cp:
        raise ValueError(f"--gpus ({gpus}) must be a positive multiple of --cp ({cp})")
    if micro_batch_tokens is None:  # the packer's budget per rank: at least one whole trajectory's share
        micro_batch_tokens = max(32768, -(-ctx // cp))
    plan = MemoryPlan(shape, ctx, gpus, cp, gpu_memory, micro_batch_tokens, gradient_checkpointing, group_size,
                      max_new_tokens, gpus_per_node=gpus_per_node or min(gpus, 8))
    b, n = shape.bytes, shape.params()
    shard = math.ceil(n / gpus)
    master = max(4, b)  # what AdamW steps, its moments and the gradients it reads: fp32 at least
    working_weights = (shape.root_params() + 2 * shape.layer_params()) * b
    parts = plan.parts
    parts["weights (FSDP2 shard)"] = shard * (b if gpus == 1 else master)  # FSDP2 shards the fp32 master weights
    if gpus == 1 and master != b:  # one process: the model's half weights + their fp32 copy (master_weights.py)
        parts["fp32 master weights"] = n * master
    parts["gradients (FSDP2 shard)"] = shard * master
    parts["optimizer state (AdamW, 2 moments)"] = 2 * shard * master
    parts["weights gathered (root + 2 layers)"] = working_weights  # a MoE layer with all its experts
    parts["activations, no checkpointing"] = activations(shape, micro_batch_tokens, False)
    parts["activations, gradient checkpointing"] = activations(shape, micro_batch_tokens, True)
    record = shape.routing_record_bytes_per_token()
    if shape.is_moe:
        parts["routing record replayed (micro-batch)"] = micro_batch_tokens * record
    kv_tokens = (ctx if kv_prompt_tokens is None else kv_prompt_tokens) + group_size * max_new_tokens
    if gpus > 1:  # FSDP2: every rank all-gathers the whole model in the compute dtype beside its shards
        parts["sampler: full weights (gathered)"] = n * b
    kv_cache = f"sampler: KV cache ({kv_tokens:,} tokens)"
    parts[kv_cache] = kv_tokens * 2 * shape.layers * shape.kv_heads * shape.head_dim * b
    parts["sampler: prefill chunk working set"] = prefill_working_set(shape, min(PREFILL_CHUNK_TOKENS, ctx))
    if shape.is_moe:
        parts["sampler: routing record (one group)"] = kv_tokens * record
    act = parts["activations, gradient checkpointing" if gradient_checkpointing else "activations, no checkpointing"]
    resident = {name: parts[name] for name in ("weights (FSDP2 shard)", "fp32 master weights",
                                               "optimizer state (AdamW, 2 moments)") if name in parts}
    plan.training_peak = (sum(resident.values()) + parts["gradients (FSDP2 shard)"] + working_weights + act
                          + parts.get("routing record replayed (micro-batch)", 0))
    # the sampler runs between updates: gradients are freed (zero_grad(set_to_none=True)), the
    # weight shards and AdamW's moments stay where they are unless moved to the host
    sampler = sum(v for k, v in parts.items() if k.startswith("sampler:"))
    plan.sampling_peak = sum(resident.values()) + sampler
    movable = ["optimizer state (AdamW, 2 moments)",
               "fp32 master weights" if gpus == 1 else "weights (FSDP2 shard)"]
    for name in movable:
        needed = offload == "on" or (offload == "auto" and plan.sampling_peak > plan.usable)
        if not needed or name not in resident:
            break
        plan.offloaded.append(name)
        plan.sampling_peak -= resident[name]
        plan.host_parts[_OFFLOADED[name]] = resident[name]
    if rollback_snapshot:  # spell_core/common/guards.py: pinned host copies, made before every update
        plan.host_parts["rollback snapshot (fp32 weights + 2 moments)"] = 3 * master * (n if gpus == 1 else shard)
    if shape.is_moe:
        groups = -(-trained_groups // (gpus // cp))
        plan.host_parts[f"routing record ({groups} trained groups)"] = groups * kv_tokens * record
    plan.advice = _advice(plan)
    return plan


OFFLOAD_CHOICES = ("auto", "on", "off")
_OFFLOADED = {"optimizer state (AdamW, 2 moments)": "optimizer state (moved while sampling)",
              "weights (FSDP2 shard)": "fp32 weights shard (moved while sampling)",
              "fp32 master weights": "fp32 master weights (moved while sampling)"}


def prefill_working_set(shape: Shape, chunk: int) -> int:
    """One prefill chunk's transient tensors in the sampler: q/k/v, the attention output and the
    residual, the MLP's gate, up and product (a MoE layer: k rows of gate/up and SwiGLU output per
    token, and the router's logits and fp32 probabilities)."""
    b = shape.bytes
    mlp = 3 * shape.intermediate if len(shape.moe_layers) < shape.layers else 0
    if shape.is_moe:
        mlp = max(mlp, 3 * shape.experts_per_token * shape.moe_intermediate)
    router = (b + 4) * shape.experts if shape.is_moe else 0
    return chunk * (b * (mlp + 2 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * shape.head_dim) + router)


def _advice(plan: MemoryPlan) -> list[str]:
    out = []
    usable = plan.usable
    if plan.training_peak > usable:
        static = plan.training_peak - plan.parts["activations, gradient checkpointing" if plan.gradient_checkpointing
                                                 else "activations, no checkpointing"]
        if not plan.gradient_checkpointing and static + plan.parts["activations, gradient checkpointing"] <= usable:
            out.append("training does not fit: add --gradient-checkpointing")
        else:
            tokens = _largest_micro_batch(plan, usable - static)
            need = -(-plan.ctx // plan.cp)
            if tokens >= need:
                out.append(f"training does not fit: lower --micro-batch-tokens to {tokens:,} or less"
                           + ("" if plan.gradient_checkpointing else " (or add --gradient-checkpointing)"))
            else:
                out.append(f"training does not fit: one trajectory needs {need:,} tokens per GPU at --cp {plan.cp}; "
                           f"raise --cp (more GPUs per sequence), add GPUs (smaller shards), or lower --ctx")
    if plan.sampling_peak > usable:
        moved = (" even with the " + " and ".join(_OFFLOADED[name].removesuffix(" (moved while sampling)")
                                                  for name in plan.offloaded) + " in host memory"
                 if plan.offloaded else "")
        instead = ("" if plan.offloaded else
                   "; or --offload-while-sampling auto (the moments and fp32 weights wait in host memory)")
        out.append(f"sampling does not fit{moved}: the full weights, what stays of the training state and one "
                   "group's KV cache exceed a GPU; lower --group-size or --max-new-tokens or --ctx (--cp does not "
                   f"split sampling), or use GPUs with more memory{instead}")
    elif plan.offloaded:
        moved = sum(plan.host_parts[_OFFLOADED[name]] for name in plan.offloaded)
        names = " and ".join(_OFFLOADED[name].removesuffix(" (moved while sampling)") for name in plan.offloaded)
        out.append(f"sampling fits with the {names} moved to host memory while sampling "
                   f"({moved / GiB:.1f} GiB per GPU, back before the update): run does it "
                   "(--offload-while-sampling auto, the default; the weights and optimizer state stay bitwise "
                   "the same; about two copies of that over PCIe per step)")
    if not out:
        out.append(f"fits with {plan.headroom / GiB:.1f} GiB to spare; the sampler's KV cache takes half the free "
                   "memory for parallel waves (--kv-budget-tokens)")
    return out


def _largest_micro_batch(plan: MemoryPlan, budget: int) -> int:
    lo, hi = 0, plan.micro_batch_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if activations(plan.shape, mid, plan.gradient_checkpointing) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def parse_bytes(text: str) -> int:
    """'80GB', '80G', '141 GiB', '8e10' -> bytes. GB and GiB both mean 2^30: a GPU sold as
    "80GB" holds 80 GiB."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"memory size {text!r}: use a number with a unit, e.g. 80GB or 141GiB")
    value, unit = float(match.group(1)), match.group(2).upper()
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(value * 1024 ** power)


def read_model_config(model: str) -> dict:
    """config.json of a local folder (or the file itself), a model alias, or a Hugging Face hub
    id (only config.json is downloaded)."""
    path = Path(model).expanduser()
    if path.is_file():
        return json.loads(path.read_text())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json")
        return json.loads((path / "config.json").read_text())
    from spell_core.models import assets

    if str(model).strip().lower() in assets._MODEL_ALIASES:
        return json.loads((assets.resolve_model(model) / "config.json").read_text())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    raise ValueError(f"--model {model!r} is neither a folder with config.json, a config.json file, a model alias "
                     "nor a Hugging Face hub id (owner/name)")


def config_source(model: str) -> str:
    """How an error names the config.json that `read_model_config(model)` read."""
    path = Path(model).expanduser()
    return str(path / "config.json") if path.is_dir() else f"{model} (config.json)" if not path.is_file() else str(path)


def build_parser() -> argparse.ArgumentParser:
    from spell_core.cli.arg_types import context_length, count

    p = argparse.ArgumentParser(prog="python -m spell_core.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="folder with config.json, a config.json, an alias or a hub id")
    p.add_argument("--ctx", required=True, type=context_length, help="context length: 16k, 128k, 131072")
    p.add_argument("--gpus", type=count(1), default=1, help="GPUs in the job (default 1)")
    p.add_argument("--cp", type=count(1), default=1, help="context parallel size (default 1)")
    p.add_argument("--gpu-memory", type=memory_size, default="80GB", help="per GPU (default 80GB)")
    p.add_argument("--micro-batch-tokens", type=count(1), default=None,
                   help="tokens per GPU per forward/backward (default: the run's 32768, or one trajectory's share)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--group-size", type=count(1), default=8, help="G samples per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=count(1), default=4096, help="(default 4096)")
    p.add_argument("--trained-groups", type=count(1), default=128,
                   help="groups one step trains, whose MoE routing record waits on the host (default 128)")
    p.add_argument("--gpus-per-node", type=count(1), default=None,
                   help="for the host memory per node (default: --gpus, at most 8)")
    p.add_argument("--offload-while-sampling", choices=OFFLOAD_CHOICES, default="auto",
                   help="as run's: auto moves AdamW's moments, then the fp32 weights, to host memory while sampling "
                        "when sampling does not fit otherwise; on moves both; off nothing (default: auto)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None, help="default: config.json's, else bfloat16")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def memory_size(text: str) -> int:
    """80GB, 141GiB, ... (parse_bytes), more than zero."""
    try:
        value = parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size {text!r} must be more than zero, e.g. 80GB")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shape = Shape.from_config(read_model_config(args.model), args.dtype, config_source(args.model))
        plan = plan_memory(shape, args.ctx, args.gpus, args.cp, args.gpu_memory, args.micro_batch_tokens,
                           args.gradient_checkpointing, args.group_size, args.max_new_tokens,
                           offload=args.offload_while_sampling, trained_groups=args.trained_groups,
                           gpus_per_node=args.gpus_per_node)
    except (ValueError, OSError) as err:
        print(f"spell.plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.report())
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())


def check_run_fits(config, args, topology=None) -> MemoryPlan:
    """`run` on a GPU, before anything is loaded: the plan of this run (config.json, the GPU's
    memory, the world size); ValueError with the plan and its advice when it does not fit. A
    trajectory holds documents + prompt room + response (`context_needed`); the sampler's KV cache
    holds a group's documents and prompt once and its G responses. What the plan moves to host
    memory while sampling (`MemoryPlan.offloaded`) is what `run` then moves (--offload-while-sampling)."""
    import torch

    from spell_core.models.assets import resolve_model
    from spell_core.selfplay.config import context_needed

    shape = Shape.from_config(read_model_config(str(resolve_model(config.model.name))))
    total = torch.cuda.get_device_properties(torch.device(config.model.device)).total_memory
    response = config.sampling.max_response_tokens
    trajectory = context_needed(config.data.ctx, config.data.prompt_tokens, response)
    plan = plan_memory(shape, trajectory, topology.world_size if topology is not None else 1, args.cp, total,
                       args.micro_batch_tokens, args.gradient_checkpointing, config.sampling.group_size,
                       response, kv_prompt_tokens=trajectory - response,
                       offload=getattr(args, "offload_while_sampling", "auto"))
    if not plan.fits:
        raise ValueError("this run does not fit in GPU memory (spell_core.plan, before loading anything):\n"
                         + plan.report())
    print(f"memory plan peak {plan.peak / GiB:.1f} of {plan.usable / GiB:.1f} GiB usable per GPU "
          f"(python -m spell_core.plan for the details)")
    return plan
