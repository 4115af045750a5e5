"""Text files people hand the engine (corpus, eval data): UTF-8 with an optional BOM and any
newline convention, and JSON Lines whose errors name the file and line at fault.

`error` is the exception class the caller's users expect (CorpusError, EvalDataError)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_utf8(path: Path, error: type[Exception] = ValueError) -> str:
    """The file's text with newlines as "\\n"; `error` names the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: byte offset {err.start} (0x{data[err.start]:02x}) is not valid UTF-8; "
            "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_objects(path: Path, error: type[Exception] = ValueError,
                  expected: str = "a JSON object") -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a JSON Lines file, where = "file:line"; `error`
    for a line that is not JSON or not an object (`expected` says what the line should hold)."""
    for number, line in enumerate(read_utf8(path, error).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        yield where, json_object(line, where, error, expected)


def json_object(line: str, where: str, error: type[Exception] = ValueError, expected: str = "a JSON object") -> dict:
    """One JSON Lines line as a dict; `error` naming `where` (file:line) when it is not JSON or not an object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise error(f"{where}: expected {expected}, got {type(record).__name__}")
    return record
