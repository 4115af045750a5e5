"""Benchmark files as released (LongBench-v2, LongBench v1 QA, DocMath-Eval, Frames, ours), in
each container (JSON array, JSON Lines, Parquet): read, detected from their fields, and scored
against hand-worked pass@1 from scripted answers; middle truncation; the external judge."""
import json
import re
from types import SimpleNamespace

import pytest

from spell_core.evaluation.benchmarks import FORMATS, EvalDataError, load_eval_data
from spell_core.eval import evaluate
from spell_core.evaluation.judge import Judge
from spell_core.evaluation.truncation import parse_budget, truncate_middle
from tests.core.scripted import scripted_generate

TABLE = "| year | revenue |\n|---|---|\n| 2020 | 7.5 |"

# format -> (records, {question: the 4 sampled replies}, {question: correct of 4, worked out by hand})
CASES = {
    "longbench-v2": (
        [{"_id": "lb2-1", "domain": "Single-Document QA", "sub_domain": "Literary", "difficulty": "easy",
          "length": "short", "question": "Who keeps the key?", "choice_A": "Ann", "choice_B": "Bob",
          "choice_C": "Cat", "choice_D": "Dan", "answer": "A", "context": "Ann keeps the key under a stone."},
         {"_id": "lb2-2", "domain": "Long In-context Learning", "sub_domain": "Translation", "difficulty": "hard",
          "length": "medium", "question": "Which colour is the door?", "choice_A": "red", "choice_B": "blue",
          "choice_C": "green", "choice_D": "white", "answer": "D", "context": "The door is painted white."}],
        {"Who keeps the key?": ["The answer is (A)", "The answer is A.", "The answer is (B)", "I cannot tell."],
         "Which colour is the door?": ["The answer is D"] * 4},
        {"Who keeps the key?": 2, "Which colour is the door?": 4}),
    "longbench": (
        [{"input": "What rings in the tower?", "context": "Passage 1: The Great Bell, called Big Ben, rings.",
          "answers": ["Big Ben", "the Great Bell"], "length": 9, "dataset": "hotpotqa", "language": "en",
          "all_classes": None, "_id": "hq-1"}],
        # "great bell" matches only the second reference: any answer counts
        {"What rings in the tower?": ["The answer is great bell", "The answer is Big Ben, the bell",
                                      "The answer is Elizabeth Tower", "No answer here."]},
        {"What rings in the tower?": 2}),
    "docmath": (
        [{"question_id": "dm-1", "question": "What was the total of revenue and costs?",
          "paragraphs": ["Revenue was 10 million.", "Costs were 2.5 million."], "tables": [TABLE],
          "ground_truth": 12.5}],
        # 1250 is 12.5 x 100 (a scale factor of the numeric rule); 13 is wrong
        {"What was the total of revenue and costs?": ["Therefore, the answer is 12.5",
                                                      "Therefore, the answer is 12.50 million",
                                                      "Therefore, the answer is 13",
                                                      "Therefore, the answer is 1250"]},
        {"What was the total of revenue and costs?": 3}),
    "frames": (
        [{"Unnamed: 0": 7, "Prompt": "Which river flows through the capital?", "Answer": "Thames",
          "reasoning_types": "Multiple constraints", "wiki_links": "['https://en.wikipedia.org/wiki/London']",
          "wiki_items": [{"title": "London", "text": "London is the capital."},
                         {"title": "River Thames", "text": "The Thames flows through London."}]}],
        {"Which river flows through the capital?": ["The answer is the River Thames", "The answer is Seine",
                                                    "The answer is Seine", "The answer is Danube"]},
        {"Which river flows through the capital?": 1}),
    "spell": (
        # one type per column, as Parquet needs (the JSON forms also take a string context and a numeric answer)
        [{"context": ["Door one.", "Door two."], "question": "How many doors are there?", "answer": "2",
          "type": "doc_math"},
         {"context": ["The lantern hangs by the door."], "question": "What hangs by the door?", "answer": "lantern",
          "type": "doc_qa"}],
        {"How many doors are there?": ["Therefore, the answer is 2", "Therefore, the answer is 3",
                                       "Therefore, the answer is two", "Therefore, the answer is 2.0"],
         "What hangs by the door?": ["The answer is a lantern"] * 3 + ["The answer is a candle"]},
        {"How many doors are there?": 2, "What hangs by the door?": 3}),
}
TYPES = {"longbench-v2": "doc_mc", "longbench": "doc_qa", "docmath": "doc_math", "frames": "doc_qa"}


def write(path, records, container):
    if container == "json":
        path.write_text(json.dumps(records, indent=1))
    elif container == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from spell_core.models.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


STUB_MODEL = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))


def replies(table):
    def script(role, text, i, j, rng):
        question = re.search(r"Question: (.*)", text).group(1).strip()
        return table[question][j]
    return script


@pytest.mark.parametrize("container", ["json", "jsonl", "parquet"])
@pytest.mark.parametrize("fmt", list(CASES))
def test_each_format_is_detected_read_and_scored(tmp_path, tokenizer, fmt, container):
    records, table, right = CASES[fmt]
    path = write(tmp_path / f"data.{container}", records, container)
    items = load_eval_data(path)
    assert [item.task.question for item in items] == [r.get("question", r.get("input", r.get("Prompt")))
                                                      for r in records]
    assert all(item.source == (records[0].get("dataset") or fmt) for item in items)
    if fmt in TYPES:
        assert {item.task.task_type for item in items} == {TYPES[fmt]}
    result = evaluate(STUB_MODEL, tokenizer, items, n=4, ks=(1, 4), max_new_tokens=32,
                      generate=scripted_generate(replies(table)), progress=False)
    by_question = {item.task.question: q for item, q in zip(items, result["questions"])}
    for question, correct in right.items():
        assert by_question[question]["correct"] == correct, question
        assert by_question[question]["pass@1"] == pytest.approx(correct / 4)
    assert result["summary"]["all"]["pass@1"] == pytest.approx(sum(right.values()) / (4 * len(right)))
    assert result["truncation"]["truncated_prompts"] == 0


def test_fields_become_tasks_and_documents(tmp_path):
    lb2 = load_eval_data(write(tmp_path / "a.json", CASES["longbench-v2"][0], "json"))[0]
    assert lb2.task.options == {"A": "Ann", "B": "Bob", "C": "Cat", "D": "Dan"} and lb2.task.answer == "A"
    assert lb2.id == "lb2-1" and lb2.documents == ("Ann keeps the key under a stone.",)
    lb = load_eval_data(write(tmp_path / "b.jsonl", CASES["longbench"][0], "jsonl"))[0]
    assert lb.references == ("Big Ben", "the Great Bell") and lb.source == "hotpotqa" and lb.id == "hq-1"
    dm = load_eval_data(write(tmp_path / "c.jsonl", CASES["docmath"][0], "jsonl"))[0]
    assert dm.task.answer == "12.5" and dm.id == "dm-1"
    # released eval: the paragraphs joined by newlines, the tables left out (we used to append them)
    assert dm.documents == ("Revenue was 10 million.\nCosts were 2.5 million.",)
    fr = load_eval_data(write(tmp_path / "d.json", CASES["frames"][0], "json"))[0]
    assert fr.documents == ("London\nLondon is the capital.", "River Thames\nThe Thames flows through London.")
    assert fr.task.answer == "Thames" and fr.id == "7"


def test_mc_prompt_lists_choices_longbench_v2_style(tmp_path, tokenizer):
    from spell_core.evaluation.eval_prompts import build_eval_prompt

    item = load_eval_data(write(tmp_path / "a.json", CASES["longbench-v2"][0], "json"))[0]
    text = build_eval_prompt(tokenizer, item.documents, item.task).text
    assert "Choices:\n(A) Ann\n(B) Bob\n(C) Cat\n(D) Dan" in text
    assert text.index("Ann keeps the key") < text.index("Question: Who keeps the key?")
    assert "The correct answer is" in text


@pytest.mark.parametrize("fmt", ["longbench-v2", "longbench", "docmath", "frames"])
def test_eval_prompt_is_the_training_responder_prompt(tmp_path, tokenizer, fmt):
    """Released: evaluation uses the training responder templates word for word."""
    from spell_core.evaluation.eval_prompts import build_eval_prompt
    from spell_core.roles import build_responder_prompt

    item = load_eval_data(write(tmp_path / "a.json", CASES[fmt][0], "json"))[0]
    assert (build_eval_prompt(tokenizer, item.documents, item.task).input_ids
            == build_responder_prompt(tokenizer, list(item.documents), item.task).input_ids)


def test_unknown_shape_lists_every_format_and_its_fields(tmp_path):
    path = write(tmp_path / "x.jsonl", [{"prompt": "q", "label": "a"}], "jsonl")
    with pytest.raises(EvalDataError) as info:
        load_eval_data(path)
    message = str(info.value)
    assert "label, prompt" in message
    for name, (fields, _) in FORMATS.items():
        assert name in message and all(f in message for f in fields)


def test_named_format_reports_missing_fields(tmp_path):
    path = write(tmp_path / "x.json", CASES["longbench-v2"][0], "json")
    with pytest.raises(EvalDataError, match=r"x.json\[0\]: missing field\(s\) question_id, paragraphs, tables, "
                                            r"ground_truth of the docmath format"):
        load_eval_data(path, "docmath")


def test_bad_benchmark_records(tmp_path):
    record = dict(CASES["longbench-v2"][0][0], answer="E")
    with pytest.raises(EvalDataError, match=r"\[0\]: 'answer' must be a letter A-D, got 'E'"):
        load_eval_data(write(tmp_path / "a.json", [record], "json"))
    record = dict(CASES["longbench"][0][0], answers="Big Ben")
    with pytest.raises(EvalDataError, match=r"b.jsonl:1: 'answers' must be a non-empty list of strings"):
        load_eval_data(write(tmp_path / "b.jsonl", [record], "jsonl"))
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    with pytest.raises(EvalDataError, match="not a readable Parquet file"):
        load_eval_data(tmp_path / "c.parquet")


# --- middle truncation -----------------------------------------------------------------------

def test_truncation_keeps_exactly_head_and_tail_of_the_budget():
    ids = list(range(100))
    assert truncate_middle(ids, 10) == ([0, 1, 2, 3, 4, 95, 96, 97, 98, 99], 90)
    assert truncate_middle(ids, 7) == ([0, 1, 2, 96, 97, 98, 99], 93)  # odd budget: the tail takes the extra one
    assert truncate_middle(ids, 100) == (ids, 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        truncate_middle(ids, 1)
    assert (parse_budget("16k"), parse_budget("100k"), parse_budget("32k"), parse_budget("5000")) == \
        (16384, 100000, 32768, 5000)


def test_long_prompts_reach_the_sampler_cut_in_the_middle(tmp_path, tokenizer):
    from spell_core.evaluation.eval_prompts import build_eval_prompt

    long_context = " ".join(f"word{i}" for i in range(400))
    records = [{"context": long_context, "question": "What hangs by the door?", "answer": "lantern",
                "type": "doc_qa"}, {"context": "short.", "question": "What hangs by the door?", "answer": "lantern",
                                    "type": "doc_qa"}]
    items = load_eval_data(write(tmp_path / "q.jsonl", records, "jsonl"))
    full = [build_eval_prompt(tokenizer, it.documents, it.task).input_ids for it in items]
    assert len(full[0]) > 300 > len(full[1])
    calls = []
    result = evaluate(STUB_MODEL, tokenizer, items, n=1, ks=(1,), max_new_tokens=8, prompt_budget=300,
                      generate=scripted_generate(lambda *a: "The answer is lantern", calls=calls), progress=False)
    sent = calls[0][1]
    assert sent[0] == full[0][:150] + full[0][-150:] and sent[1] == full[1]
    assert result["truncation"] == {"prompt_budget": 300, "truncated_prompts": 1, "dropped_tokens": len(full[0]) - 300}
    assert [q["truncated_tokens"] for q in result["questions"]] == [len(full[0]) - 300, 0]


# --- external judge --------------------------------------------------------------------------

def test_judge_raises_qa_and_math_scores_never_multiple_choice(tmp_path, tokenizer):
    records = [{"context": "c", "question": "What hangs by the door?", "answer": "lantern", "type": "doc_qa"},
               {"context": "c", "question": "How many doors?", "answer": 2, "type": "doc_math"},
               {"context": "c", "question": "Which one?", "answer": "B", "type": "doc_mc",
                "options": ["w", "x", "y", "z"]}]
    items = load_eval_data(write(tmp_path / "q.jsonl", records, "jsonl"))
    answers = {"What hangs by the door?": ["The answer is lantern", "The answer is a lamp",
                                           "The answer is a torch", "I do not know"],
               "How many doors?": ["Therefore, the answer is two", "Therefore, the answer is 2",
                                   "Therefore, the answer is 5", "Therefore, the answer is 5"],
               "Which one?": ["The answer is A"] * 4}
    judged = []

    def script(role, text, i, j, rng):
        if "Ground-truth answer:" not in text:
            return answers[re.search(r"Question: (.*)", text).group(1).strip()][j]
        predicted = re.search(r"Predicted answer: (.*)", text).group(1).strip()
        judged.append(predicted)
        # the judge accepts "a lamp" and "two", rejects the rest; one reply without a decision
        if predicted in ("a lamp", "Therefore, the answer is two"):
            return "Same thing. [[YES]]"
        return "Hmm." if predicted == "a torch" else "Different. [[NO]]"

    generate = scripted_generate(script)
    judge = Judge(STUB_MODEL, tokenizer, "scripted-judge", max_new_tokens=16)
    result = evaluate(STUB_MODEL, tokenizer, items, n=4, ks=(1,), max_new_tokens=16, judge=judge,
                      generate=generate, progress=False)
    qa, math, mc = result["questions"]
    # rule-correct samples are not judged; the unparsable "I do not know" and "... is two" (no number
    # for math extraction) go as "None", as the released scripts format a missing prediction
    assert sorted(judged) == sorted(["a lamp", "a torch", "None", "None", "5", "5"])
    assert (qa["rule_correct"], qa["correct"]) == (1, 2)  # lantern by rule, "a lamp" by the judge
    assert qa["judge_verdicts"] == ["rule", True, False, False]  # "Hmm." has no YES: 0, as released
    assert (math["rule_correct"], math["correct"]) == (1, 1)  # 2 by rule; "two" reached the judge as None
    assert mc["correct"] == 0 and mc["judge_verdicts"] == ["letter"] * 4
    assert "judge scripted-judge" in result["scoring"]


def test_judge_and_self_verifier_are_exclusive(tokenizer):
    with pytest.raises(ValueError, match="pick one"):
        evaluate(STUB_MODEL, tokenizer, [], n=1, ks=(1,), max_new_tokens=8, verifier=True,
                 judge=Judge(STUB_MODEL, tokenizer, "j"), generate=lambda *a, **k: [], progress=False)


def test_judge_decodes_greedily_once_cuts_its_prompt_in_the_middle_and_is_sent_none_for_an_unparsed_answer(tmp_path, tokenizer):
    """What the judge's `generate` is called with, checked on the call itself: one greedy sample
    (n=1, temperature 0) of max_new_tokens, the evaluation's seed; a prompt longer than 8,192
    tokens sent as its first 4,096 and last 4,096 tokens (a judge whose context is 4,096 with
    1,024 new tokens: 3,072 = 1,536 + 1,536); an answer with no final sentence sent as "None", as
    the released scripts send str(None) (docs/fidelity.md)."""
    from spell_core.evaluation.judge import build_judge_prompt
    from spell_core.roles import Task

    calls = []

    def judge_generate(model, tokenizer, prompts, **kwargs):
        calls.append((prompts, kwargs))
        return [[SimpleNamespace(text="Same. [[YES]]")] for _ in prompts]

    task = Task("doc_qa", "What hangs by the door?", "lantern")
    long_prediction = " ".join(f"lamp{i}" for i in range(6000))  # > 8,192 tokens
    full = build_judge_prompt(tokenizer, task, long_prediction, budget=10**9)
    assert len(full) > 8192
    wide = Judge(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=131072)), tokenizer, "j",
                 max_new_tokens=64)
    assert wide.verdicts([(task, long_prediction), (task, "a lamp")], generate=judge_generate, seed=11) == [True, True]
    (prompts, kwargs), = calls
    assert kwargs == {"n": 1, "max_new_tokens": 64, "temperature": 0.0, "seed": 11, "progress": None}
    assert len(prompts[0]) == 8192 and prompts[0] == full[:4096] + full[-4096:]
    assert prompts[1] == build_judge_prompt(tokenizer, task, "a lamp", budget=10**9)  # short: whole
    narrow = Judge(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)), tokenizer, "j",
                   max_new_tokens=1024)
    narrow.verdicts([(task, long_prediction)], generate=judge_generate, seed=0, kv_budget_tokens=5000)
    prompts, kwargs = calls[1]
    assert prompts[0] == full[:1536] + full[-1536:] and kwargs["kv_budget_tokens"] == 5000

    # through the evaluation: a 3,500-character response without "The answer is": the judge reads
    # "None" as the predicted answer, none of the response
    items = load_eval_data(write(tmp_path / "q.jsonl", [{"context": "c", "question": "What hangs by the door?",
                                                          "answer": "lantern", "type": "doc_qa"}], "jsonl"))
    answered = scripted_generate(lambda *a: "a" * 1500 + "b" * 2000)
    calls.clear()

    def generate(model, tokenizer, prompts, **kwargs):
        if "Ground-truth answer:" in tokenizer.decode(prompts[0]):
            return judge_generate(model, tokenizer, prompts, **kwargs)
        return answered(model, tokenizer, prompts, **kwargs)

    result = evaluate(STUB_MODEL, tokenizer, items, n=1, ks=(1,), max_new_tokens=4000, judge=wide, generate=generate,
                      progress=False)
    (prompts, kwargs), = calls
    text = tokenizer.decode(prompts[0])
    assert "Predicted answer: None\n" in text and "aaaa" not in text and "bbbb" not in text
    assert result["questions"][0]["judge_verdicts"] == [True]
