"""`run`'s loading: the model (RoPE scaled to `--ctx`), the corpus and its clusters, and the KV budget on a GPU."""
from __future__ import annotations

import collections
import statistics
import sys
import time

from spell_core.selfplay.config import RunConfig

def gpu_kv_budget(model) -> int:
    import torch

    from spell_core.sampling.kv_cache import kv_bytes_per_token

    free, _ = torch.cuda.mem_get_info()
    weight = model.lm_head_weight
    return max(1, int(free * 0.5) // kv_bytes_per_token(model.config, weight.dtype))


def load_model_and_documents(config: RunConfig, budget: int, documents=None):
    from spell_core.cli.input_checks import run_documents
    from spell_core.models.assets import resolve_model
    from spell_core.data.documents import build_clusters
    from spell_core.models.model import load_pretrained
    from spell_core.models.rope import with_rope_scaling

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
    from spell_core.cli.preflight import long_context_warning
    warning = long_context_warning(model, config.data.ctx, native_ctx, 2 * config.loop.questions)
    if warning:
        print(warning, file=sys.stderr)

    start = time.perf_counter()
    corpus_path = config.data.corpus if isinstance(config.data.corpus, str) else ", ".join(config.data.corpus)
    if documents is None:
        documents = run_documents(config)
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
