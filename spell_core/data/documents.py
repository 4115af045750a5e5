"""Documents and clusters: what the questioner and the responder read (SPEC.md).

`load_documents(folder)` reads every `.txt`, `.md` and `.jsonl` file under a folder (sorted by
path; hidden files and folders skipped):
- `.txt` / `.md`: one work per file. Project Gutenberg header and licence are stripped. A
  play is split into scenes (into acts when it has no scene headings); the text before the
  first heading (title, list of characters) is a document of its own. A `.md` file without
  play headings is split at its `#` / `##` headings. Anything else stays one document.
- `.jsonl`: one document per line, `{"id": str|int, "text": str, "cluster": str|int?,
  "tasks": [str]|str?, "data_source": str?}`, taken as they are (no splitting). Documents
  sharing a `cluster` value are related; without it, the documents of one file are.
  `tasks` (e.g. ["doc_math"] or "doc_qa,doc_mc") limits the task types asked of the document;
  `data_source` names its source for `--tasks PREFIX=...` rules (spell_core/data/task_types.py).
Text must be UTF-8 (a BOM is accepted): undecodable bytes are an error naming the file and
the byte offset rather than silently replaced, so no question is ever asked about mojibake.

`build_clusters(documents, tokenizer, budget_tokens)` groups related documents (same work,
or same jsonl cluster) into clusters of consecutive documents whose token total fits the
budget, counted as the prompts show them: each document with the tags and separator the
role prompts put around it (roles/chat.py), so that many small documents cannot overflow the
context; documents with different task types never share a cluster. Each group is cut into
the fewest clusters possible, of balanced sizes. A document longer than the budget is first
split into consecutive pieces that fit, at paragraph boundaries (blank lines), else at line
breaks, else at spaces, else inside the text; the pieces keep the document's place and get ids `<id>#1`, `<id>#2`, ….
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from spell_core.roles.chat import document_wrapper_tokens
from spell_core.roles.tasks import TASK_TYPES
from spell_core.data.task_types import parse_types
from spell_core.common.textfiles import jsonl_objects, read_utf8

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl")


class CorpusError(ValueError):
    """A corpus folder or file that cannot be read as documents; the message says what to fix."""


@dataclass
class Document:
    id: str  # unique in the corpus: `<work>/<nnn>` for split text files, the jsonl id otherwise
    text: str  # a str, or a text kept on disk until read (`StoredText`, table corpora: corpus_tables.py)
    source: str  # file (and line, for jsonl) it came from
    n_tokens: int | None = None  # filled in by count_tokens / build_clusters
    group: str = ""  # related documents share it: the work (file) or the jsonl cluster
    data_source: str = ""  # source name for --tasks PREFIX=... rules: jsonl `data_source`, else the work
    tasks: tuple[str, ...] | None = None  # task types it supports; None: decided by task_types.TaskRules


def _get_text(doc: Document) -> str:
    text = doc.__dict__["_text"]
    return text if isinstance(text, str) else text.read()


def _set_text(doc: Document, value) -> None:
    doc.__dict__["_text"] = value


Document.text = property(_get_text, _set_text)  # after @dataclass, so that the field keeps no default


@dataclass
class Cluster:
    id: str
    documents: list[Document] = field(default_factory=list)
    n_tokens: int = 0  # as the prompts show the documents: their tokens plus each one's tags and separator
    tasks: tuple[str, ...] = TASK_TYPES  # the task types the questioner may ask of it (equal weight)
    source: str = ""  # the data_source of its documents ("" for folder corpora)


# ------------------------------------------------------------------------------- loading


def load_documents(folder: str | Path) -> list[Document]:
    """All documents of a corpus folder, in a stable order (files sorted by path)."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus folder {root} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus {root} is not a folder; pass a folder of .txt / .md / .jsonl files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    if not files:
        raise CorpusError(f"corpus folder {root} is empty; put .txt / .md / .jsonl files in it")
    supported = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not supported:
        shown = ", ".join(str(p.relative_to(root)) for p in files[:5])
        raise CorpusError(
            f"corpus folder {root} has no .txt / .md / .jsonl files (found {len(files)} other "
            f"file(s): {shown}{', ...' if len(files) > 5 else ''})"
        )
    documents: list[Document] = []
    for path in supported:
        work = path.relative_to(root).with_suffix("").as_posix()
        if path.suffix.lower() == ".jsonl":
            documents += _jsonl_documents(path, work)
        else:
            documents += _text_documents(path, work, markdown=path.suffix.lower() == ".md")
    if not documents:
        raise CorpusError(f"corpus folder {root}: every .txt / .md / .jsonl file is empty")
    _check_unique_ids(documents)
    return documents


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _text_documents(path: Path, work: str, markdown: bool) -> list[Document]:
    text = strip_gutenberg(read_utf8(path, CorpusError))
    pieces = split_play(text)
    if len(pieces) == 1 and markdown:
        pieces = _split_at_markdown_headings(text)
    return [
        Document(id=f"{work}/{i:03d}", text=piece, source=str(path), group=work, data_source=work)
        for i, piece in enumerate(pieces)
    ]


def _jsonl_documents(path: Path, work: str) -> list[Document]:
    documents = []
    for where, record in jsonl_objects(path, CorpusError, expected="a JSON object with 'id' and 'text'"):
        for key in ("id", "text"):
            if key not in record:
                raise CorpusError(f"{where}: missing field {key!r} (a line needs 'id' and 'text', 'cluster' is optional)")
        doc_id, text, cluster = record["id"], record["text"], record.get("cluster")
        if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or str(doc_id) == "":
            raise CorpusError(f"{where}: 'id' must be a non-empty string or an integer, got {doc_id!r}")
        if not isinstance(text, str) or not text.strip():
            raise CorpusError(f"{where}: 'text' must be a non-empty string")
        if cluster is not None and (not isinstance(cluster, (str, int)) or isinstance(cluster, bool)):
            raise CorpusError(f"{where}: 'cluster' must be a string or an integer, got {cluster!r}")
        group = work if cluster is None else str(cluster)
        data_source = record.get("data_source", work)
        if not isinstance(data_source, str):
            raise CorpusError(f"{where}: 'data_source' must be a string, got {data_source!r}")
        tasks = None
        if record.get("tasks") is not None:
            try:
                tasks = parse_types(record["tasks"], f"{where}: 'tasks'")
            except ValueError as err:
                raise CorpusError(str(err)) from None
        documents.append(Document(id=str(doc_id), text=text, source=where, group=group, data_source=data_source,
                                  tasks=tasks))
    return documents


def _check_unique_ids(documents: Sequence[Document]) -> None:
    first_seen: dict[str, str] = {}
    for doc in documents:
        if doc.id in first_seen:
            raise CorpusError(f"document id {doc.id!r} appears twice: {first_seen[doc.id]} and {doc.source}")
        first_seen[doc.id] = doc.source


# ---------------------------------------------------------------- Gutenberg and play text

_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG|^End of (?:the )?Project Gutenberg", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's start and end markers (all of it when absent)."""
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


# Scene and act headings as the Gutenberg and Folio texts write them: "SCENE II.",
# "Scene 3.--A street", "ACT II. SCENE I.", "ACT FIRST", "Actus Primus. Scoena Prima.".
# The keyword must be capitalised and start the line, so prose ("a scene that...") and the
# setting line of the front matter ("SCENE: Elsinore.") are not headings.
_NUMBER = (
    r"(?i:[ivxlc]+|\d+|first|second|third|fourth|fifth|"
    r"prim[au]s?|secund[au]s?|terti[au]s?|quart[au]s?|quint[au]s?|sext[au]s?|septim[au]s?|octav[au]s?)"
)
_SCENE_HEADING = re.compile(
    rf"^[ \t]*(?:(?:ACT|Act|ACTUS|Actus)[ \t]+{_NUMBER}\.?[ \t]+)?(?:SCENE|Scene|SCENA|Scena|SCOENA|Scoena)[ \t]+{_NUMBER}\b",
    re.M,
)
_ACT_HEADING = re.compile(rf"^[ \t]*(?:ACT|Act|ACTUS|Actus)[ \t]+{_NUMBER}\b[^\n]{{0,30}}$", re.M)
_MARKDOWN_HEADING = re.compile(r"^#{1,2}[ \t]+\S", re.M)


def split_play(text: str) -> list[str]:
    """A play cut at its scene and act headings, each piece starting at its heading. An act
    heading starts a piece that runs to the end of the act's first scene (so an act's
    prologue stays with it); the text before the first heading is the first piece. Text
    with fewer than two headings comes back whole."""
    acts = {m.start() for m in _ACT_HEADING.finditer(text)}
    scenes = {m.start() for m in _SCENE_HEADING.finditer(text)}
    cuts, act_awaits_scene = [], False
    for position in sorted(acts | scenes):
        if position not in acts and act_awaits_scene:
            act_awaits_scene = False  # the act's first scene: stays in the act heading's piece
            continue
        act_awaits_scene = position in acts and position not in scenes  # not "ACT II. SCENE I."
        cuts.append(position)
    return _pieces(text, cuts)


def _split_at_markdown_headings(text: str) -> list[str]:
    return _pieces(text, [m.start() for m in _MARKDOWN_HEADING.finditer(text)])


def _pieces(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at `cuts` (stripped, empty pieces dropped); whole with fewer than two cuts."""
    if len(cuts) < 2:
        cuts = []
    bounds = [0, *cuts, len(text)]
    pieces = (text[a:b].strip() for a, b in zip(bounds, bounds[1:]))
    return [piece for piece in pieces if piece]


# ---------------------------------------------------------------------------- clustering

TokenCounter = Callable[[list[str]], list[int]]


def token_counter(tokenizer) -> TokenCounter:
    """texts -> token counts (no special tokens), one batched tokenizer call per list. A fast
    (Rust) tokenizer is called directly: for many short texts the transformers wrapper costs
    more than the tokenization itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        if encode_batch is not None:
            return [len(encoding.ids) for encoding in encode_batch(list(texts), add_special_tokens=False)]
        encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    return count


def count_tokens(documents: Sequence[Document], tokenizer, chunk_docs: int = 1024,
                 chunk_chars: int = 1 << 22) -> list[Document]:
    """The documents with `n_tokens` filled in where missing, counted in batches of at most
    `chunk_docs` documents and about `chunk_chars` characters (texts kept on disk are never
    all in memory at once, nor the tokenizer's encodings of more than one batch)."""
    count = token_counter(tokenizer)
    batch, texts, chars = [], [], 0
    for doc in documents:
        if doc.n_tokens is not None:
            continue
        batch.append(doc)
        texts.append(doc.text)
        chars += len(texts[-1])
        if len(batch) == chunk_docs or chars >= chunk_chars:
            for counted, n in zip(batch, count(texts)):
                counted.n_tokens = n
            batch, texts, chars = [], [], 0
    for counted, n in zip(batch, count(texts)):
        counted.n_tokens = n
    return list(documents)


def build_clusters(documents: Sequence[Document], tokenizer, budget_tokens: int,
                   wrapper_tokens: int | None = None) -> list[Cluster]:
    """Related documents packed into clusters of consecutive documents, each with at most
    `budget_tokens` tokens in all, counting `wrapper_tokens` more per document (the tags and
    separator the prompts put around it; None: measured with the tokenizer); groups in order
    of first appearance, documents in their original order. Documents over the budget are
    split first (see the module docstring). A cluster holds documents of one task-type set
    (`Document.tasks`, see task_types.py)."""
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < 1:
        raise ValueError(f"budget_tokens must be a positive integer, got {budget_tokens!r}")
    if not documents:
        raise CorpusError("no documents to cluster")
    count = token_counter(tokenizer)
    if wrapper_tokens is None:
        wrapper_tokens = document_wrapper_tokens(count)
    text_budget = budget_tokens - wrapper_tokens  # what a document's own text may take
    if text_budget < 1:
        raise ValueError(f"budget_tokens={budget_tokens} cannot hold any document: the prompt puts {wrapper_tokens} "
                         "tokens of tags around each one; raise --ctx")
    documents = count_tokens(documents, tokenizer)
    fitted: list[Document] = []
    for doc in documents:
        fitted += [doc] if doc.n_tokens <= text_budget else _split_document(doc, text_budget, count)

    groups: dict[tuple[str, tuple[str, ...]], list[Document]] = {}
    for doc in fitted:
        groups.setdefault((doc.group, doc.tasks or TASK_TYPES), []).append(doc)
    task_sets: dict[str, int] = {}
    for group, _ in groups:
        task_sets[group] = task_sets.get(group, 0) + 1
    clusters = []
    for (group, tasks), docs in groups.items():
        name = group if task_sets[group] == 1 else f"{group}[{'+'.join(tasks)}]"
        shown = [d.n_tokens + wrapper_tokens for d in docs]
        for k, part in enumerate(_balanced_partition(shown, budget_tokens)):
            members = [docs[i] for i in part]
            clusters.append(Cluster(f"{name}#c{k}", members, sum(shown[i] for i in part), tasks,
                                    members[0].data_source))
    return clusters


def _greedy_partition(lengths: list[int], cap: int) -> list[range]:
    parts, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if total + n > cap and i > start:
            parts.append(range(start, i))
            start, total = i, 0
        total += n
    parts.append(range(start, len(lengths)))
    return parts


def _balanced_partition(lengths: list[int], budget: int) -> list[range]:
    """Consecutive parts, each summing to at most `budget`: the fewest parts possible (what
    greedy filling gives), with the largest part as small as possible for that count."""
    fewest = len(_greedy_partition(lengths, budget))
    low, high = max(lengths), budget  # greedy(cap) has <= fewest parts iff cap >= optimum
    while low < high:
        mid = (low + high) // 2
        if len(_greedy_partition(lengths, mid)) <= fewest:
            high = mid
        else:
            low = mid + 1
    return _greedy_partition(lengths, low)


_SEPARATORS = (re.compile(r"\n(?:[ \t]*\n)+"), re.compile(r"\n"), re.compile(r"[ \t]+"))  # blank lines, line, space


def _split_document(doc: Document, budget: int, count: TokenCounter) -> list[Document]:
    stored = doc.__dict__["_text"]
    pieces, start, out = _split_text(doc.text, budget, count), 0, []
    for k, (text, n) in enumerate(pieces, start=1):  # the pieces join back to the text
        size = len(text.encode("utf-8"))
        out.append(replace(doc, id=f"{doc.id}#{k}", text=text if isinstance(stored, str) else stored.part(start, size),
                           n_tokens=n))
        start += size
    return out


def _split_text(text: str, budget: int, count: TokenCounter, n_tokens: int | None = None) -> list[tuple[str, int]]:
    """(piece, tokens) for consecutive pieces of `text` that each fit the budget, cut at the
    coarsest separator that exists. Every piece is re-counted as a whole, so merges across a
    cut can never push one over the budget."""
    n_tokens = count([text])[0] if n_tokens is None else n_tokens
    if n_tokens <= budget:
        return [(text, n_tokens)]
    if len(text) == 1:
        raise ValueError(f"a budget of {budget} tokens cannot hold the single character {text!r}")
    units = _units(text)
    unit_tokens = count(units)
    groups = [units[r.start:r.stop] for r in _greedy_partition(unit_tokens, budget)]
    if len(groups) == 1:  # the units fit, their concatenation does not: halve
        groups = [units[: len(units) // 2], units[len(units) // 2:]]
    texts = ["".join(group) for group in groups]
    pieces = []
    for piece, n in zip(texts, count(texts)):
        pieces += _split_text(piece, budget, count, n)
    return pieces


def _units(text: str) -> list[str]:
    """`text` cut after each occurrence of the coarsest separator present (separators stay
    with the unit before them, so the units join back to `text`); halves when none is."""
    for separator in _SEPARATORS:
        ends = [m.end() for m in separator.finditer(text) if 0 < m.end() < len(text)]
        if ends:
            bounds = [0, *ends, len(text)]
            return [text[a:b] for a, b in zip(bounds, bounds[1:])]
    middle = len(text) // 2
    return [text[:middle], text[middle:]]
