"""The held-out set (bench/heldout/build.py, wonderland.jsonl): every item answerable from its document
by its rule, recomputed here without the builder's helpers, not from its question, and the same
bytes every build."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from bench.heldout import build
from spell_core.evaluation.benchmarks import load_eval_data

SHIPPED = Path(build.__file__).with_name("wonderland.jsonl")


@pytest.fixture(scope="module")
def items():
    return [json.loads(line) for line in SHIPPED.read_text().splitlines()]


@pytest.fixture(scope="module")
def count_tokens():
    return build.default_token_counter()


def test_the_shipped_file_is_a_spell_benchmark_of_80_or_more_questions_over_three_types(items):
    loaded = load_eval_data(SHIPPED)
    assert len(loaded) == len(items) >= 80
    assert len({item.id for item in loaded}) == len(loaded)  # --compare pairs questions by id
    types = Counter(item["type"] for item in items)
    assert set(types) == {"doc_qa", "doc_math", "doc_mc"} and min(types.values()) >= 15
    assert SHIPPED.stat().st_size < 1_000_000


def test_copy_retrieval_answers_follow_their_cue_in_the_document_and_not_in_the_question(items):
    for item in (i for i in items if i["type"] == "doc_qa" and not i["rule"].startswith("speaker")):
        cue = re.fullmatch(r'Which two words come right after "(.+)" in the passage\?', item["question"]).group(1)
        words = cue.split() + item["answer"].split()
        pattern = r"(?<![A-Za-z])" + r"\s+".join(map(re.escape, words)) + r"(?![A-Za-z])"
        assert len(re.findall(pattern, item["context"], re.I)) >= 1, item["id"]
        # the cue occurs once in the document, so one pair of words follows it
        cue_pattern = r"(?<![A-Za-z])" + r"\W+".join(map(re.escape, cue.split())) + r"(?![A-Za-z])"
        assert len(re.findall(cue_pattern, item["context"], re.I)) == 1, item["id"]
        assert item["answer"].lower() not in item["question"].lower(), item["id"]


def test_speaker_answers_follow_their_quotation_in_the_document_and_the_quotation_is_unique(items):
    speakers = [i for i in items if i["rule"].startswith("speaker")]
    assert len(speakers) >= 30
    book = " ".join(" ".join(re.findall(r"[a-z]+", i["context"].lower())) for i in
                    {i["document"]: i for i in items}.values())
    for item in speakers:
        quote = re.fullmatch(r'In the passage, who says "(.+)"\?', item["question"]).group(1)
        # `<quote>,' said the <answer> (or cried, asked, ... ): the speaker named right after the quotation
        pattern = "`" + re.escape(quote) + r"[,!?]' [a-z]+ (?:the )?" + re.escape(item["answer"]) + r"(?![A-Za-z])"
        assert len(re.findall(pattern, item["context"])) == 1, item["id"]
        assert f" {book} ".count(" " + " ".join(re.findall(r"[a-z]+", quote.lower())) + " ") == 1, item["id"]
        assert item["answer"].lower() not in quote.lower(), item["id"]
    # most are not Alice, whom a blind guess would name
    assert sum(i["answer"] == "Alice" for i in speakers) <= len(speakers) / 4


def test_counts_match_an_independent_count_of_the_document(items):
    maths = [i for i in items if i["type"] == "doc_math"]
    for item in maths:
        word = re.search(r'the word "([a-z]+)"', item["question"]).group(1)
        count = sum(1 for _ in re.finditer(rf"(?<![A-Za-z]){word}(?![A-Za-z])", item["context"], re.IGNORECASE))
        assert int(item["answer"]) == count, item["id"]
        assert 2 <= count <= 9
    # no single count dominates: a guessed number is right for few questions
    assert max(Counter(i["answer"] for i in maths).values()) <= 0.5 * len(maths)


def test_multiple_choice_right_sentence_is_in_the_document_and_the_distractors_are_not(items):
    mcs = [i for i in items if i["type"] == "doc_mc"]
    for item in mcs:
        flat = " ".join(item["context"].split())
        right = "ABCD".index(item["answer"])
        for i, option in enumerate(item["options"]):
            assert (option in flat) == (i == right), (item["id"], i)
            assert option not in item["question"]
    assert set(i["answer"] for i in mcs) == set("ABCD")


def test_right_letters_are_balanced_before_the_grounding_check_removes_lucky_guesses(count_tokens, tmp_path):
    every = build.build(count_tokens, grounding=tmp_path / "no-grounding.json")
    letters = Counter(i["answer"] for i in every if i["type"] == "doc_mc")
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 2
    left_out = json.loads(build.GROUNDING_FILE.read_text())["answered"]
    assert len(every) - len(left_out) == len(SHIPPED.read_text().splitlines())


def test_documents_are_1k_to_3k_tokens_of_the_default_model(items, count_tokens):
    sizes = {item["document"]: count_tokens(item["context"]) for item in items}
    assert len(sizes) >= 16 and all(1000 <= n <= 3000 for n in sizes.values()), sizes


def test_the_checks_reject_an_item_that_breaks_its_rule(items):
    qa = next(i for i in items if i["type"] == "doc_qa")
    with pytest.raises(build.HeldoutError, match="not in the document"):
        build.check_item({**qa, "answer": "purple elephants"})
    math = next(i for i in items if i["type"] == "doc_math")
    with pytest.raises(build.HeldoutError, match="count does not match"):
        build.check_item({**math, "answer": str(int(math["answer"]) + 1)})
    mc = next(i for i in items if i["type"] == "doc_mc")
    wrong = "ABCD"[("ABCD".index(mc["answer"]) + 1) % 4]
    with pytest.raises(build.HeldoutError, match="right sentence is not in the document"):
        build.check_item({**mc, "answer": wrong})


def test_the_build_gives_the_shipped_bytes_every_time(count_tokens):
    first = build.to_jsonl(build.build(count_tokens))
    assert first == SHIPPED.read_bytes()
    assert build.to_jsonl(build.build(count_tokens)) == first


def test_questions_answered_without_their_document_are_left_out(items, tmp_path):
    listed = tmp_path / "grounding.json"
    listed.write_text(json.dumps({"answered": [items[0]["id"]]}))
    kept = build.build(lambda text: len(text) // 4, grounding=listed)
    assert items[0]["id"] not in {item["id"] for item in kept}
    assert len(build.build(lambda text: len(text) // 4, grounding=tmp_path / "none.json")) == len(kept) + 1
