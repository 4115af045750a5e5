"""--shuffle-options: a generated multiple-choice question's options are permuted before the
responders see it, and its answer letter follows the right text.

Oracles: the right option's text (each task is checked against the text the questioner marked),
and the uniform distribution over the 4 letters / 24 orders, with bounds worked by hand."""
import collections
import random
import re

from spell_core.cli.run_options import config_from_args
from spell_core.roles import DOC_MC, DOC_QA, Status, Task, shuffle_options
from spell_core.selfplay.loop import SelfPlay
from tests.core.scripted import scripted_generate
from tests.core.test_loop import config, tiny  # noqa: F401  (the module's tiny model fixture)

OPTIONS = {"A": "the lantern", "B": "the candle", "C": "the torch", "D": "the lamp"}


def test_the_right_text_keeps_the_answer_letter_whatever_the_order():
    rng = random.Random(7)
    orders = collections.Counter()
    letters = collections.Counter()
    for draw in range(2400):
        right = "ABCD"[draw % 4]
        task = shuffle_options(Task(DOC_MC, "Which light?", right, dict(OPTIONS)), rng)
        assert task.options[task.answer] == OPTIONS[right]
        assert sorted(task.options.values()) == sorted(OPTIONS.values())
        assert (task.task_type, task.question) == (DOC_MC, "Which light?")
        orders[tuple(task.options.values())] += 1
        letters[task.answer] += 1
    # uniform: each letter 600 expected, sd sqrt(2400 * 1/4 * 3/4) = 21.2, so 5 sd = 106;
    # each of the 24 orders 100 expected, sd sqrt(2400 * 1/24 * 23/24) = 9.8, so 5 sd = 49
    assert set(letters) == set("ABCD") and all(abs(c - 600) < 106 for c in letters.values()), letters
    assert len(orders) == 24 and all(abs(c - 100) < 49 for c in orders.values()), orders


def test_other_tasks_pass_through_untouched():
    rng = random.Random(0)
    state = rng.getstate()
    task = Task(DOC_QA, "Who?", "Alice")
    assert shuffle_options(task, rng) is task
    listed = Task(DOC_MC, "Which? A) x B) y C) z D) w", "B")  # evaluation data: options inside the question
    assert shuffle_options(listed, rng) is listed
    assert rng.getstate() == state


def test_the_flag_reaches_the_loop_options():
    assert config_from_args(["--device", "cpu"])[0].loop.shuffle_options is False
    assert config_from_args(["--device", "cpu", "--shuffle-options"])[0].loop.shuffle_options is True


def _mc_scenario(role, text, i, j, rng):
    if role == "questioner":  # always marks A, as the lean questioner did
        options = ", ".join(f'"{k}": "{v}"' for k, v in OPTIONS.items())
        return f'```json\n{{"question": "Which light in case {i}?", "options": {{{options}}}, "answer": "A"}}\n```'
    if role == "grounding":
        return "The answer is unknown."
    if role == "responder":  # picks the lantern wherever it is listed
        letter = re.search(r"\(([A-D])\) the lantern", text).group(1)
        return f"The correct answer is {letter}."
    return "[[YES]]"


def test_responders_see_the_shuffled_options_and_are_scored_on_the_text(tiny, monkeypatch):  # noqa: F811
    model, tokenizer, clusters = tiny
    for cluster in clusters:
        monkeypatch.setattr(cluster, "tasks", (DOC_MC,))
    answers = {}
    for shuffle in (False, True):
        play = SelfPlay(model, tokenizer, clusters, config(questions=24, shuffle_options=shuffle),
                        generate=scripted_generate(_mc_scenario))
        result = play.step()
        ok = [q for q in result.questions if q.status == Status.OK]
        assert len(ok) == 24
        assert all(q.task.options[q.task.answer] == "the lantern" for q in ok)
        answers[shuffle] = collections.Counter(q.task.answer for q in ok)
        # the responders found the lantern where it was shown, and the rule rewarded it
        assert all(q.responder.rule_rewards == [1.0] * 4 for q in ok), [q.responder.answers for q in ok]
    assert answers[False] == {"A": 24}
    # 24 draws: P(one letter gets none) <= 4 * (3/4)^24 ≈ 0.004; the seed is fixed, so this is exact
    assert set(answers[True]) == set("ABCD"), answers[True]
