"""Peak memory of loading and clustering a large table corpus (`--corpus big.parquet`).

    python bench/corpus_memory.py --size-gb 2 --file /tmp/spell-bench-corpus.parquet

Writes a parquet file of random words (`text`, `cluster` columns; 16 KiB documents, 8 per
cluster, row groups of 2,048 rows) unless it exists, then, in a fresh process: loads a
tokenizer and notes the peak resident memory (the baseline), then runs `load_corpus` +
`build_clusters` (budget 11,264 tokens, as `--ctx 16k`) and notes the peak again. The
tokenizer is a word-level one (one token per word), so that 2 GB are tokenized in minutes on
a small CPU; memory does not depend on it. Prints one JSON line. Delete the file afterwards
(`--delete`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DOC_BYTES, DOCS_PER_CLUSTER, ROW_GROUP = 16 * 1024, 8, 2048


def generate(path: Path, size_gb: float, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
             for _ in range(20_000)]
    block = " ".join(rng.choice(words, size=12_000_000))  # ~64 MB of words; documents are slices of it
    schema = pa.schema([("text", pa.string()), ("cluster", pa.int64())])
    tmp = path.with_name(path.name + ".tmp")
    row, target = 0, size_gb * 2**30
    with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
        while tmp.stat().st_size < target:
            starts = rng.integers(0, len(block) - DOC_BYTES, size=ROW_GROUP)
            texts = [block[s:s + DOC_BYTES] for s in starts]
            clusters = [(row + i) // DOCS_PER_CLUSTER for i in range(ROW_GROUP)]
            writer.write_table(pa.table({"text": texts, "cluster": clusters}, schema=schema))
            row += ROW_GROUP
    os.replace(tmp, path)


def word_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import pyarrow.parquet as pq

    first = pq.ParquetFile(path).read_row_group(0, columns=["text"]).column(0)[0].as_py()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(first.split()))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(path: Path) -> dict:
    from spell_core.data.corpus_tables import load_corpus
    from spell_core.data.documents import build_clusters

    tokenizer = word_tokenizer(path)
    baseline = peak_rss_mib()
    began = time.perf_counter()
    documents = load_corpus(str(path))
    loaded = time.perf_counter() - began
    after_load = peak_rss_mib()
    clusters = build_clusters(documents, tokenizer, 11_264)
    return {"file_gib": path.stat().st_size / 2**30, "documents": len(documents), "clusters": len(clusters),
            "tokens": sum(c.n_tokens for c in clusters), "baseline_peak_mib": baseline,
            "peak_after_load_mib": after_load, "peak_after_clustering_mib": peak_rss_mib(),
            "load_s": loaded, "total_s": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--file", type=Path, default=Path("/tmp/spell-bench-corpus.parquet"))
    parser.add_argument("--measure", action="store_true", help="(internal) measure in this process")
    parser.add_argument("--delete", action="store_true", help="delete the file at the end")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.file)))
        return
    if not args.file.exists():
        began = time.perf_counter()
        generate(args.file, args.size_gb)
        print(f"generated {args.file} ({args.file.stat().st_size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - began:.0f} s", file=sys.stderr)
    try:
        subprocess.run([sys.executable, __file__, "--measure", "--file", str(args.file)], check=True)
    finally:
        if args.delete:
            args.file.unlink()


if __name__ == "__main__":
    main()
