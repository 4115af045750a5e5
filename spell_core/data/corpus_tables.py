"""Corpora in table files, read in batches so that a corpus larger than memory is never loaded
whole: texts are copied to an unlinked temporary file and read back when a prompt needs them
(`StoredText`); memory holds one batch of rows plus a few hundred bytes per document.

`load_corpus(["train.parquet", ...], text_field="text", cluster_field="cluster")` reads:
- parquet files (pyarrow, batch by batch),
- JSON Lines files (line by line),
- folders saved by `datasets.Dataset.save_to_disk` (their arrow files, batch by batch),
- folders of .txt / .md / .jsonl and corpus aliases, as before (`spell_core.data.documents.load_documents`).

A table row is one document: its `text_field` column; documents sharing a `cluster_field`
value are related (without that column, those of one file are); a `data_source` column, if
any, names the dataset of each row (without it, the file's path without suffix does, as for
`--tasks PREFIX=TYPES`). SPELL's released training files have another layout,
recognised by their columns `question_id, paragraphs, data_source`: one row is a cluster of
related documents (the strings of `paragraphs`), and its `data_source` (`docmath…`,
`ultrafineweb…`) is carried by the documents and their clusters (`Cluster.source`).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from spell_core.common.textfiles import json_object
from spell_core.data.documents import CorpusError, Document, _check_unique_ids, load_documents

TABLE_SUFFIXES = (".parquet", ".jsonl")
RELEASE_COLUMNS = ("question_id", "paragraphs", "data_source")
BATCH_ROWS = 1024


class TextSpool:
    """An append-only, unlinked temporary file of UTF-8 texts (gone when the process ends)."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="spell-corpus-")
        self._size = 0
        self._dirty = False

    def add(self, text: str) -> "StoredText":
        data = text.encode("utf-8")
        self._file.write(data)
        stored = StoredText(self, self._size, len(data))
        self._size += len(data)
        self._dirty = True
        return stored

    def read(self, offset: int, size: int) -> str:
        if self._dirty:
            self._file.flush()
            self._dirty = False
        return os.pread(self._file.fileno(), size, offset).decode("utf-8")


class StoredText:
    """A document's text on disk: read on each access, never kept."""
    __slots__ = ("spool", "offset", "size")

    def __init__(self, spool: TextSpool, offset: int, size: int):
        self.spool, self.offset, self.size = spool, offset, size

    def read(self) -> str:
        return self.spool.read(self.offset, self.size)

    def part(self, start: int, size: int) -> "StoredText":
        """The bytes [start, start + size) of this text (on character boundaries)."""
        if start < 0 or start + size > self.size:
            raise ValueError(f"part [{start}, {start + size}) outside a text of {self.size} bytes")
        return StoredText(self.spool, self.offset + start, size)


def is_table(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() in TABLE_SUFFIXES) or _is_saved_dataset(path)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def load_corpus(corpus: str | Sequence[str], *, text_field: str = "text", cluster_field: str = "cluster",
                batch_rows: int = BATCH_ROWS) -> list[Document]:
    """The documents of one corpus (alias, folder, table file, saved dataset) or of several
    table files / saved datasets, in order."""
    from spell_core.models.assets import resolve_corpus

    specs = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not specs:
        raise CorpusError("no corpus given")
    paths = [Path(spec).expanduser() for spec in specs]
    missing = [p for p in paths if not p.exists() and (len(paths) > 1 or p.suffix.lower() in TABLE_SUFFIXES)]
    if missing:
        raise CorpusError(f"corpus file {missing[0]} does not exist")
    if len(paths) == 1 and not is_table(paths[0]):
        return load_documents(resolve_corpus(specs[0]))
    not_tables = [str(p) for p in paths if not is_table(p)]
    if not_tables:
        raise CorpusError(f"corpus {not_tables[0]} is not a table: several corpora must each be a .parquet or "
                          ".jsonl file or a folder saved by datasets' save_to_disk")
    spool, documents = TextSpool(), []
    for path in paths:
        for where, row_fields, rows in _row_batches(path, batch_rows):
            documents += _row_documents(where, row_fields, rows, spool, text_field, cluster_field)
    if not documents:
        raise CorpusError(f"corpus {', '.join(map(str, paths))}: no rows")
    _check_unique_ids(documents)
    return documents


# ------------------------------------------------------------------------- row batches

RowBatch = tuple[str, list[str], list[tuple[int, dict]]]  # (file, its columns, [(row number, row)])


def _row_batches(path: Path, batch_rows: int) -> Iterator[RowBatch]:
    if path.is_dir():
        yield from _saved_dataset_batches(path, batch_rows)
    elif path.suffix.lower() == ".parquet":
        yield from _parquet_batches(path, batch_rows)
    else:
        yield from _jsonl_batches(path, batch_rows)


def _parquet_batches(path: Path, batch_rows: int) -> Iterator[RowBatch]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
        raise CorpusError(f"{path}: not a readable parquet file ({err})") from None
    columns, row = table.schema_arrow.names, 0
    # one row group at a time: iter_batches keeps what it has read until the file is done
    for group in range(table.metadata.num_row_groups):
        for batch in table.read_row_group(group).to_batches(max_chunksize=batch_rows):
            rows = batch.to_pylist()
            yield str(path), columns, list(enumerate(rows, start=row))
            row += len(rows)


def _saved_dataset_batches(path: Path, batch_rows: int) -> Iterator[RowBatch]:
    import pyarrow as pa

    if not (path / "state.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise CorpusError(f"{path} holds several splits ({', '.join(splits)}); pass one of them, e.g. "
                          f"--corpus {path / (splits[0] if splits else 'train')}")
    files = [entry["filename"] for entry in json.loads((path / "state.json").read_text()).get("_data_files", [])]
    row = 0
    for name in files:
        with pa.OSFile(str(path / name)) as source:  # read batch by batch (a memory map would keep them all resident)
            reader = pa.ipc.open_stream(source)
            columns = reader.schema.names
            for batch in reader:
                for start in range(0, batch.num_rows, batch_rows):
                    rows = batch.slice(start, batch_rows).to_pylist()
                    yield f"{path / name}", columns, list(enumerate(rows, start=row))
                    row += len(rows)


def _jsonl_batches(path: Path, batch_rows: int) -> Iterator[RowBatch]:
    rows, columns = [], set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(f"{path}:{number}: byte {err.start} of the line is not valid UTF-8; convert the "
                                  "file to UTF-8") from None
            if not line.strip():
                continue
            record = json_object(line, f"{path}:{number}", CorpusError)
            columns.update(record)
            rows.append((number, record))
            if len(rows) == batch_rows:
                yield str(path), sorted(columns), rows
                rows = []
    if rows:
        yield str(path), sorted(columns), rows


# ------------------------------------------------------------------------- rows -> documents


def _row_documents(file: str, columns: list[str], rows, spool: TextSpool, text_field: str,
                   cluster_field: str) -> list[Document]:
    release = all(c in columns for c in RELEASE_COLUMNS) and text_field not in columns
    if not release and text_field not in columns:
        raise CorpusError(f"{file}: no column {text_field!r} (columns: {', '.join(columns)}); name the text "
                          "column with --text-field, or use SPELL's layout (question_id, paragraphs, data_source)")
    stem, documents = Path(file).stem, []
    file_source = str(Path(file).with_suffix(""))  # the source name of rows without data_source (--tasks PREFIX=)
    for number, row in rows:
        where = f"{file}:{number}"
        if release:
            documents += _release_row(where, row, spool)
            continue
        text, cluster, data_source = row.get(text_field), row.get(cluster_field), row.get("data_source")
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{where}: {text_field!r} must be a non-empty string, got {_short(text)}")
        if cluster is not None and (not isinstance(cluster, (str, int)) or isinstance(cluster, bool)):
            raise CorpusError(f"{where}: {cluster_field!r} must be a string or an integer, got {_short(cluster)}")
        if data_source is not None and not isinstance(data_source, str):
            raise CorpusError(f"{where}: 'data_source' must be a string, got {_short(data_source)}")
        doc_id = row.get("id")
        doc_id = str(doc_id) if isinstance(doc_id, (str, int)) and str(doc_id) else f"{stem}/{number}"
        documents.append(Document(doc_id, spool.add(text), where, group=stem if cluster is None else str(cluster),
                                  data_source=data_source or file_source))
    return documents


def _release_row(where: str, row: dict, spool: TextSpool) -> list[Document]:
    question_id, paragraphs, data_source = (row.get(c) for c in RELEASE_COLUMNS)
    if not isinstance(data_source, str) or not data_source:
        raise CorpusError(f"{where}: 'data_source' must be a non-empty string, got {_short(data_source)}")
    if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
        raise CorpusError(f"{where}: 'paragraphs' must be a list of strings (the documents), got {_short(paragraphs)}")
    texts = [p for p in paragraphs if p.strip()]
    if not texts:
        raise CorpusError(f"{where}: 'paragraphs' holds no non-empty document")
    group = f"{data_source}/{question_id}"
    return [Document(f"{group}/{i:03d}", spool.add(text), where, group=group, data_source=data_source)
            for i, text in enumerate(texts)]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
