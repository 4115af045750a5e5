"""Rendering a role prompt through the tokenizer's chat template.

Every role prompt is one user message `shared + specific`: `shared` is the part several
prompts have in common (the documents of a cluster, with the fixed instructions before
them), `specific` the part that changes (the question). `Prompt.prefix_len` says how many
leading token ids every prompt with the same `shared` text has in common, so that the
sampler and trainer can compute that prefix once.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    text: str  # the chat template's rendering, generation prompt included
    input_ids: list[int]  # the tokenization of `text` (what apply_chat_template(tokenize=True) gives)
    prefix_len: int  # leading ids equal to those of the shared part rendered alone; 0 if none


def document_text(document) -> str:
    """The text of a document: a `Document`-like object (`.text`) or a plain string."""
    text = document if isinstance(document, str) else getattr(document, "text", None)
    if not isinstance(text, str):
        raise TypeError(f"a document must be a str or have a str .text attribute, got {type(document).__name__}")
    return text


DOCUMENT_OPEN, DOCUMENT_CLOSE, DOCUMENT_SEPARATOR = "<document>\n", "\n</document>", "\n\n"


def render_documents(documents: Sequence) -> str:
    """Documents in order, each inside <document> tags, without numbers or titles (the
    questioner must write questions that do not point at "document 2")."""
    return DOCUMENT_SEPARATOR.join(f"{DOCUMENT_OPEN}{document_text(d).strip()}{DOCUMENT_CLOSE}" for d in documents)


def document_wrapper_tokens(count: Callable[[list[str]], list[int]]) -> int:
    """Tokens render_documents adds around each document (separator + tags), measured with
    `count` (texts -> token counts) as the growth of a rendering from one document to two,
    less the document itself. The first document has no separator: counting one for every
    document keeps a cluster's estimate an upper bound."""
    probe = "x"
    one, two, alone = count([render_documents([probe]), render_documents([probe, probe]), probe])
    return max(0, two - one - alone)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# tokenizer -> {rendered shared text: its ids}: prompts over the same documents (several
# questions on one cluster) tokenize the long shared part once
_PREFIX_CACHE: "weakref.WeakKeyDictionary[object, OrderedDict[str, list[int]]]" = weakref.WeakKeyDictionary()
_PREFIX_CACHE_SIZE = 8


def _prefix_ids(tokenizer, prefix_text: str) -> list[int]:
    try:
        cache = _PREFIX_CACHE.setdefault(tokenizer, OrderedDict())
    except TypeError:  # not weak-referenceable: no cache
        return _encode(tokenizer, prefix_text)
    ids = cache.get(prefix_text)
    if ids is None:
        ids = cache[prefix_text] = _encode(tokenizer, prefix_text)
        while len(cache) > _PREFIX_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(prefix_text)
    return ids


def render_prompt(tokenizer, shared: str, specific: str, *, template_kwargs: dict | None = None) -> Prompt:
    """Render the user message `shared + specific` with the tokenizer's chat template,
    generation prompt included, and tokenize it.

    `prefix_len` is measured, not assumed: the rendered text up to the end of `shared` is
    tokenized alone (once per distinct text, cached) and compared with the full
    tokenization, so a tokenizer that merges tokens across the boundary gives a shorter
    (still exact) shared prefix.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template "
                         "(a Jinja template) or use an instruct/chat checkpoint")
    content = shared + specific
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(template_kwargs or {}))
    input_ids = _encode(tokenizer, text)
    prefix_len = 0
    start = text.find(content)
    if shared and start >= 0:
        prefix_ids = _prefix_ids(tokenizer, text[: start + len(shared)])
        prefix_len = _common_prefix_length(prefix_ids, input_ids)
    return Prompt(messages=messages, text=text, input_ids=input_ids, prefix_len=prefix_len)


def thinking_template_kwargs(tokenizer, enable_thinking: bool | None) -> dict:
    """`{"enable_thinking": enable_thinking}` for a chat template that reads that variable
    (Qwen3's); {} when it is None (the template's own default) or the template ignores it."""
    template = getattr(tokenizer, "chat_template", None)
    if enable_thinking is None or not isinstance(template, str) or "enable_thinking" not in template:
        return {}
    return {"enable_thinking": bool(enable_thinking)}


def token_counter(tokenizer) -> Callable[[str], int]:
    """`count(text)` = number of tokens of `text` alone (for the span-length rule)."""
    return lambda text: len(_encode(tokenizer, text))
