"""`python -m spell_core.run`: the command users type.

For now it resolves the configuration, loads the model and the documents, builds the
clusters and prints their statistics. The self-play loop is a later issue.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from spell_core.assets import AssetError
from spell_core.config import DataOptions, ModelOptions, RunConfig, parse_ctx
from spell_core.data import CorpusError


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="python -m spell_core.run",
        description="SPELL self-play RL on long documents (one model: questioner, responder, verifier).",
    )
    parser.add_argument("--ctx", type=_ctx_argument, default=defaults.data.ctx,
                        help="context length in tokens: 16k, 128k, 131072, 1m (default: 16k)")
    parser.add_argument("--model", default=defaults.model.name,
                        help=f"model alias or local Hugging Face checkpoint folder (default: {defaults.model.name})")
    parser.add_argument("--corpus", default=defaults.data.corpus,
                        help=f"corpus alias or folder of .txt/.md/.jsonl files (default: {defaults.data.corpus})")
    parser.add_argument("--out", default=defaults.out, help=f"output folder of the run (default: {defaults.out})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"random seed (default: {defaults.seed})")
    parser.add_argument("--device", type=_device_argument, default=defaults.model.device,
                        help="auto (cuda when available), cpu, cuda or cuda:N (default: auto)")
    return parser


def _ctx_argument(text: str) -> int:
    try:
        return parse_ctx(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    args = build_parser().parse_args(argv)
    return RunConfig(
        model=ModelOptions(name=args.model, device=args.device),
        data=DataOptions(corpus=args.corpus, ctx=args.ctx),
        out=args.out,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    try:
        budget = config.cluster_budget
    except ValueError as err:
        build_parser().error(str(err))  # exits with status 2
    print("spell: resolved configuration")
    for key, value in _flatten(config.to_dict()):
        print(f"  {key:<30} {value}")
    try:
        _show_model_and_documents(config, budget)
    except (AssetError, CorpusError, ValueError) as err:  # bad model, corpus or checkpoint: no traceback
        print(f"spell: error: {err}", file=sys.stderr)
        return 1
    print("\nspell: the self-play loop is not implemented yet (a later issue); nothing was trained.")
    return 0


def _show_model_and_documents(config: RunConfig, budget: int) -> None:
    import torch

    from spell_core.assets import resolve_corpus, resolve_model
    from spell_core.data import build_clusters, load_documents
    from spell_core.model import load_pretrained

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = config.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    start = time.perf_counter()
    model_path = resolve_model(config.model.name)
    model, tokenizer = load_pretrained(model_path, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    native_ctx = model.config.max_position_embeddings
    print(f"\nmodel       {model_path} ({model.config.model_type}, {model.config.num_hidden_layers} layers, "
          f"{next(model.parameters()).dtype}, {device}; loaded in {time.perf_counter() - start:.1f} s)")
    print(f"parameters  {n_params:,} ({n_params / 1e6:.1f} M)")
    print(f"vocabulary  {model.config.vocab_size:,} (tokenizer: {len(tokenizer):,} tokens)")
    print(f"native ctx  {native_ctx:,} tokens" + (
        f" (--ctx {config.data.ctx:,} is longer: needs RoPE scaling)" if config.data.ctx > native_ctx else ""))

    start = time.perf_counter()
    corpus_path = resolve_corpus(config.data.corpus)
    documents = load_documents(corpus_path)
    clusters = build_clusters(documents, tokenizer, budget)
    sizes = [cluster.n_tokens for cluster in clusters]
    n_works = len({doc.group for doc in documents})
    n_pieces = sum(len(cluster.documents) for cluster in clusters)
    split_note = f" ({n_pieces:,} once those over the budget are split)" if n_pieces != len(documents) else ""
    print(f"documents   {len(documents):,}{split_note} from {n_works:,} works, "
          f"{sum(doc.n_tokens for doc in documents):,} tokens, in {corpus_path}")
    print(f"clusters    {len(clusters):,}, at most {budget:,} tokens each (ctx {config.data.ctx:,} − prompt "
          f"{config.data.prompt_tokens:,} − response {config.sampling.max_response_tokens:,}); "
          f"built in {time.perf_counter() - start:.1f} s")
    print(f"tokens per cluster  min {min(sizes):,}  median {statistics.median(sizes):,.0f}  max {max(sizes):,}")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    print(f"config      written to {out / 'config.json'}")


def _flatten(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


if __name__ == "__main__":
    sys.exit(main())
