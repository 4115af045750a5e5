"""Which task types each document supports (SPEC.md, "Questioner": task types are tied to corpora).

The released code asks math questions of financial / math documents and QA or multiple
choice of web text. Here each document gets its task types from, most specific first:

1. its own `tasks` field (jsonl documents: a list like ["doc_math"] or a string "doc_qa,doc_mc");
2. the `--tasks PREFIX=TYPES` rules the user gave: the longest PREFIX that its source name
   starts with (`Document.data_source`: the jsonl/parquet field `data_source`, else the file's
   path in the corpus without suffix);
3. the `--tasks TYPES` form without a prefix: the whole corpus;
4. the built-in rules DEFAULT_RULES (docmath -> doc_math; ultrafineweb -> doc_qa, doc_mc);
5. all three types.

A cluster holds documents with the same task types only (data.build_clusters), and the
questioner draws among its types with equal weight.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from spell_core.roles.tasks import TASK_TYPES

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "docmath": ("doc_math",),
    "ultrafineweb": ("doc_qa", "doc_mc"),
}


def parse_types(value: str | Sequence[str], where: str = "--tasks") -> tuple[str, ...]:
    """Task types from "doc_qa,doc_mc" or ["doc_qa", "doc_mc"]: deduplicated, in TASK_TYPES order.
    An unknown or empty list is an error naming `where`."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        raise ValueError(f"{where}: task types must be a list of names or a comma-separated string, got {value!r}")
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{where}: no task type given; choose from {', '.join(TASK_TYPES)}")
    unknown = [n for n in names if n not in TASK_TYPES]
    if unknown:
        raise ValueError(f"{where}: unknown task type {unknown[0]!r}; choose from {', '.join(TASK_TYPES)}")
    return tuple(t for t in TASK_TYPES if t in names)


@dataclass
class TaskRules:
    """The parsed `--tasks` options: per-prefix rules and an optional whole-corpus default."""

    prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    corpus: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, options: Iterable[str] | None) -> "TaskRules":
        """`--tasks` values, each "TYPES" (the whole corpus) or "PREFIX=TYPES"; repeatable."""
        rules = cls()
        for option in options or ():
            prefix, sep, types = option.partition("=")
            if not sep:
                if rules.corpus is not None:
                    raise ValueError(f"--tasks {option}: the whole-corpus form is given twice; "
                                     "give it once, and PREFIX=TYPES for parts of the corpus")
                rules.corpus = parse_types(option, f"--tasks {option}")
                continue
            prefix = prefix.strip()
            if not prefix:
                raise ValueError(f"--tasks {option}: the prefix before '=' is empty; write PREFIX=TYPES "
                                 "(e.g. docmath=doc_math) or TYPES alone for the whole corpus")
            if prefix in rules.prefixes:
                raise ValueError(f"--tasks {option}: prefix {prefix!r} is given twice")
            rules.prefixes[prefix] = parse_types(types, f"--tasks {option}")
        return rules

    def types_for(self, source: str, own: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The task types of a document with source name `source` and its own `tasks` field."""
        if own:
            return own
        for table in (self.prefixes, None, DEFAULT_RULES):
            if table is None:
                if self.corpus is not None:
                    return self.corpus
                continue
            matches = [p for p in table if source.startswith(p)]
            if matches:
                return table[max(matches, key=len)]
        return TASK_TYPES

    def apply(self, documents: Sequence) -> list:
        """Set `tasks` on every document (objects with `.data_source` and `.tasks`)."""
        for doc in documents:
            doc.tasks = self.types_for(doc.data_source, doc.tasks)
        return list(documents)
