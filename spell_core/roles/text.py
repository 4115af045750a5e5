"""Text helpers shared by the roles: thinking removal, fenced JSON, answer cleaning,
answer normalisation, number and option-letter parsing. Pure functions on strings."""
from __future__ import annotations

import json
import math
import re
import string
import unicodedata

# --- reasoning traces ---------------------------------------------------------------------

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def strip_thinking(text: str) -> str | None:
    """The part of a model output after its reasoning trace.

    Everything up to the last `</think>` is dropped. An output that opens `<think>` and
    never closes it (the model ran out of tokens while thinking) has no final part: None.
    """
    close = text.rfind(_THINK_CLOSE)
    if close >= 0:
        return text[close + len(_THINK_CLOSE):]
    if _THINK_OPEN in text:
        return None
    return text


# --- fenced JSON --------------------------------------------------------------------------

_JSON_FENCE = re.compile(r"```json(.*?)```", re.DOTALL)


def last_json_object(text: str) -> dict | None:
    """The task object of a questioner output, as the released `get_record` reads it: the
    last ```json fenced block (the tag is required, lower case) whose body parses as JSON;
    without one, the whole text as JSON. None unless the result is a JSON object."""
    for match in reversed(list(_JSON_FENCE.finditer(text))):
        try:
            value = json.loads(match.group(1).strip())
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --- cleaning an extracted answer -----------------------------------------------------------


_BOXED = re.compile(r"\\boxed\s*\{")


def boxed_contents(text: str) -> list[str]:
    r"""The contents of every `\boxed{...}` in `text`, in order (nested braces allowed; an
    unbalanced last box gives what follows it)."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, i = 1, match.end()
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    contents.append(text[i:j])
                    break
        else:
            contents.append(text[i:])
    return contents


def unbox(text: str) -> str:
    r"""The content of the last `\boxed{...}` (nested braces allowed); `text` if none."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else text


_MATH_DELIMITERS = (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$"))


def clean_answer(text: str) -> str:
    r"""Tidy a final answer: first line only, no markdown emphasis, no math delimiters,
    no `\boxed{}`, no trailing period."""
    text = text.strip().lstrip(":").strip()
    text = text.split("\n", 1)[0]
    text = text.replace("**", "").replace("__", "").strip()
    text = text.rstrip(".").strip()
    for left, right in _MATH_DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left):-len(right)].strip()
            break
    if "\\boxed{" in text:
        text = unbox(text).strip()
    return text.rstrip(".").strip()


# --- normalisation for cover exact match --------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and Unicode), drop the articles a/an/the,
    collapse whitespace."""
    text = text.lower()
    text = "".join(c for c in text if not _is_punctuation(c))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# --- numbers ------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_FRACTION = re.compile(rf"({_NUMBER})\s*/\s*({_NUMBER})")
_SINGLE_NUMBER = re.compile(_NUMBER)
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def parse_number(text: str) -> float | None:
    r"""The first number written in `text`, as a float; None when there is none.

    Understands `\boxed{}`, LaTeX fractions, thousands separators (`1,234.5`), signs
    (including the Unicode minus), scientific notation and `a/b` fractions. Currency
    symbols, percent signs and units around the number are ignored: `12.5%` is 12.5 and
    `$3.2 million` is 3.2 (the numeric reward's scale factors cover 100, 1e3, 1e6, 1e9).
    """
    text = unbox(text)
    text = _LATEX_TEXT.sub(r" \1 ", text)
    text = _LATEX_FRACTION.sub(r"(\1)/(\2)", text)
    text = text.replace("\u2212", "-").replace("\\,", "").replace("\\!", "").replace("{,}", ",")
    text = text.replace("(", " ").replace(")", " ")
    fraction = _FRACTION.search(text)
    single = _SINGLE_NUMBER.search(text)
    if single is None:
        return None
    if fraction is not None and fraction.start() == single.start():
        denominator = _to_float(fraction.group(2))
        if denominator != 0:
            return _to_float(fraction.group(1)) / denominator
    value = _to_float(single.group(0))
    return value if math.isfinite(value) else None


# --- multiple-choice letters --------------------------------------------------------------

CHOICE_LETTERS = ("A", "B", "C", "D")

# "B", "(B)", "B)", "B) text", "B. text", "B: text", "[B]"; a lower-case letter only when
# a delimiter or the end follows, so that the article in "a dog" is not read as option A.
_BARE_LETTER = re.compile(r"^[(\[]?(?:([A-D])(?:[)\].:,]|\s|$)|([a-d])(?:[)\].:,]|$))")
# "Option B", "option (b)", "Choice C"
_NAMED_LETTER = re.compile(r"^(?:option|choice)\s*[(\[]?([A-Da-d])(?:[)\].:,]|\s|$)", re.IGNORECASE)


def parse_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer picks, or None.

    An answer that repeats the text of exactly one option (after normalisation) picks
    that option; otherwise the letter is read from the start of the answer.
    """
    text = text.strip()
    if options:
        said = normalize_answer(text)
        hits = [k for k, v in options.items() if normalize_answer(str(v)) == said and said]
        if len(hits) == 1 and hits[0] in CHOICE_LETTERS:
            return hits[0]
    for pattern in (_BARE_LETTER, _NAMED_LETTER):
        match = pattern.match(text)
        if match:
            return next(g for g in match.groups() if g).upper()
    return None
