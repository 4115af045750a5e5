"""The decode step replayed from CUDA graphs (`generate(..., cuda_graph=True)`, CUDA only).

NOT TESTED in CI (no GPU there): the eager path in sampler.py is the reference; run
tests/core/test_sampler.py's GPU check before relying on this.

One graph per batch-size bucket (powers of two, capped at the wave's sample count), captured
the first time a live batch needs it, for one `generate` call only (graphs hold pointers to
the current weights and cache; nothing outlives the call). Inputs go through static
buffers: rows past the live batch are padding that writes its K/V to a scratch slot (the
cache's last, outside every wave) and attends to nothing. The grid sizes of the decode
attention kernel come from the wave's maxima (queries per group, prompt length,
max_new_tokens), fixed at capture; the kernel skips the keys a row does not have.
Sampling stays outside the graph. An MoE model's expert ids (routing_capture.py) are graph
outputs too: the MoE layers write them into the capture's record, which each replay overwrites;
`RoutingCapture.decode` copies the live rows out on the device (no host sync).
"""
import contextlib
import warnings

import torch
import torch.nn.functional as F

from spell_core.sampling.kv_cache import DecodeAttention
from spell_core.models.rope import rotary_cos_sin
from spell_kernels._dispatch import kernel_mode

__all__ = ["CudaGraphDecoder", "check_cuda_graph_support", "choose_cuda_graph"]


def check_cuda_graph_support(model) -> None:
    if model.lm_head_weight.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    if model.config.rope["rope_type"] == "dynamic":
        raise ValueError("cuda_graph=True does not support dynamic RoPE (its frequencies change with the "
                         "sequence length); use cuda_graph=False")
    if kernel_mode() == "torch":
        raise ValueError("cuda_graph=True needs the Triton decode kernel; unset SPELL_KERNELS=torch")


def choose_cuda_graph(model, requested: bool | None, warn=None) -> bool:
    """Whether the self-play loop decodes with the CUDA graph. requested None (the default): on
    for a model on CUDA that supports it; a CUDA model that does not gets eager decoding, said once
    through `warn`. requested True: on, or the reason it cannot be as an error. False: off."""
    if requested is False:
        return False
    if requested is None and model.lm_head_weight.device.type != "cuda":
        return False
    try:
        check_cuda_graph_support(model)
    except ValueError as err:
        if requested:
            raise ValueError(f"--cuda-graph: {err}") from None
        if warn is not None:
            warn(f"spell: decoding without the CUDA graph (--no-cuda-graph to silence): {err}")
        return False
    return True


class CudaGraphDecoder:
    """Callable like sampler._decode_step: live samples -> logits (B, V)."""

    def __init__(self, model, cache, layout, counts: list[int], max_new_tokens: int, scale: float, decode_tables,
                 eager_step, capture: bool = True, routing=None):
        self.model, self.cache, self.layout, self.scale = model, cache, layout, scale
        self.routing = routing  # a RoutingCapture (MoE models) or None
        self.capture = capture  # False: the same static-buffer step, run eagerly (tests, debugging)
        self.decode_tables, self.eager_step = decode_tables, eager_step
        self.num_groups, self.total = len(counts), sum(counts)
        self.maxima = dict(max_group_queries=max(counts), max_prefix_len=max(layout.prompt_len),
                           max_own_len=max_new_tokens)
        self.scratch_slot = cache.num_slots - 1
        c, device = model.config, cache.k.device
        positions = torch.arange(max(layout.prompt_len) + max_new_tokens, device=device)
        self.cos, self.sin = rotary_cos_sin(c.rope, c.head_dim, c.max_position_embeddings, positions,
                                            dtype=model.lm_head_weight.dtype)
        self.graphs, self.pool, self.failed = {}, None, False

    def __call__(self, live):
        if self.failed:
            return self.eager_step(self.model, self.cache, self.layout, live, self.scale, routing=self.routing)
        b = len(live)
        bucket = min(1 << (b - 1).bit_length(), self.total)
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = (self._capture(bucket) if self.capture
                                       else (None, self._buffers(bucket), None, None))
            except RuntimeError as err:  # keep generating, eagerly
                warnings.warn(f"CUDA graph capture failed ({err}); decoding eagerly", RuntimeWarning)
                self.failed = True
                return self.eager_step(self.model, self.cache, self.layout, live, self.scale, routing=self.routing)
        graph, static, logits, record = self.graphs[bucket]
        self._fill(static, self.decode_tables(self.layout, live, torch.device("cpu")), b)
        if graph is None:
            record = self._recorder()
            logits = self._forward(static, record)
        else:
            graph.replay()
        if self.routing is not None:
            self.routing.decode(record, live)
        return logits[:b]

    def _recorder(self):
        return None if self.routing is None else self.routing.recorder()

    def _buffers(self, bucket):
        dev = self.cache.k.device
        long = dict(dtype=torch.long, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        g = self.num_groups
        return dict(input_ids=torch.zeros(bucket, **long), position_ids=torch.zeros(bucket, **long),
                    write_slots=torch.full((bucket,), self.scratch_slot, **long),
                    own_start=torch.full((bucket,), self.scratch_slot, **i32), own_len=torch.zeros(bucket, **i32),
                    prefix_start=torch.zeros(g, **i32), prefix_len=torch.zeros(g, **i32),
                    cu_group_queries=torch.zeros(g + 1, **i32))

    def _fill(self, static, tables, b):
        """Live rows first; padding rows and unused groups get empty key ranges."""
        for name in ("input_ids", "position_ids", "write_slots", "own_start", "own_len"):
            pad = {"write_slots": self.scratch_slot, "own_start": self.scratch_slot}.get(name, 0)
            static[name][b:].fill_(pad)
            static[name][:b].copy_(tables[name])
        g = tables["prefix_len"].numel()
        for name in ("prefix_start", "prefix_len"):
            static[name][g:].fill_(0)
            static[name][:g].copy_(tables[name])
        static["cu_group_queries"][g + 1:].fill_(b)
        static["cu_group_queries"][:g + 1].copy_(tables["cu_group_queries"])

    def _forward(self, static, routing=None):
        """CausalLM.forward_hidden's layer loop without its host-side checks, + the LM head at 1/T;
        routing: a Routing('record') the MoE layers write their expert ids to."""
        model = self.model
        x = model.model.embed_tokens(static["input_ids"])
        cos, sin = self.cos.index_select(0, static["position_ids"]), self.sin.index_select(0, static["position_ids"])
        attn = DecodeAttention(self.cache, static["write_slots"], static["prefix_start"], static["prefix_len"],
                               static["cu_group_queries"], static["own_start"], static["own_len"], **self.maxima)
        with _recording(model, routing):
            for i, layer in enumerate(model.model.layers):
                x = layer(x, cos, sin, attn, i, *(() if routing is None else (routing,)))
        return F.linear(model.model.norm(x) * self.scale, model.lm_head_weight)

    def _capture(self, bucket):
        static = self._buffers(bucket)  # all padding: warm-up and capture write only the scratch slot
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the kernels and settles the allocator outside the capture
                self._forward(static, self._recorder())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        record = self._recorder()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(static, record)
        self.pool = graph.pool()
        return graph, static, logits, record


@contextlib.contextmanager
def _recording(model, routing):
    """The MoE blocks record only inside a CausalLM forward (models/moe.py: `live`); this loop
    calls the layers itself, so it marks them for its length."""
    blocks = list(model.moe_blocks().values()) if routing is not None else []
    for block in blocks:
        block.live = True
    try:
        yield
    finally:
        for block in blocks:
            block.live = False
