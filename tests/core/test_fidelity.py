"""docs/fidelity.md: the rows where we follow the method's released code, each worked by hand.
(Rows whose tests sit beside older ones: test_rewards, test_parsing, test_selection,
test_answers, test_prompts, test_eval, test_eval_benchmarks; docs/fidelity.md names them.)"""
import random
from types import SimpleNamespace

import pytest
import torch

from spell_core.training import loss_weights
from spell_core.evaluation.eval_metrics import best_at_k, expected_best_at_k, mean_at_n, mean_over_benchmarks, pass_at_k
from spell_core.evaluation.judge import JUDGE_MAX_NEW_TOKENS, Judge, judged_text, parse_judge_verdict
from spell_core.training.loss_weights import released_micro_batches, role_shares, trajectory_token_weights
from spell_core.roles import Task
from spell_core.selfplay.task_mix import TaskMix, split_sizes
from spell_core.training.trainer import Trainer, TrainerOptions
from tests.core.test_trainer import TEMPERATURE, synthetic_batch, tiny_models

# --- evaluation: mean@n, bootstrap best@k, pass@k, overall ----------------------------------


def test_best_at_8_of_one_correct_in_eight_is_about_0_66():
    """Bootstrap best@k = mean over 1000 resamples (k draws with replacement) of their max; its
    expectation for c of n is 1 - (1 - c/n)^k = 1 - (7/8)^8 = 0.65639 (worked by hand: (7/8)^8 =
    5,764,801 / 16,777,216 = 0.34361). Each resample's max is Bernoulli(0.656): the mean of 1000
    has a standard error of sqrt(0.656 x 0.344 / 1000) = 0.015, so 0.05 is over 3 of them."""
    scores = [1.0] + [0.0] * 7
    assert expected_best_at_k(8, 1, 8) == pytest.approx(1 - 5764801 / 16777216, abs=1e-12)
    assert best_at_k(scores, 8) == pytest.approx(0.65639, abs=0.05)
    assert best_at_k(scores, 8) == best_at_k(scores, 8)  # seeded with 42 every time, as released
    assert pass_at_k(8, 1, 8) == 1.0  # the unbiased estimator (without replacement) says 1
    assert mean_at_n(scores) == 0.125
    # best@1 is the mean score (up to resampling); all-correct and all-wrong are exact
    assert best_at_k(scores, 1) == pytest.approx(0.125, abs=0.035)
    assert best_at_k([1.0] * 8, 4) == 1.0 and best_at_k([0.0] * 8, 4) == 0.0
    # c = 4 of 8, k = 2: 1 - (1/2)^2 = 0.75
    assert best_at_k([1.0, 0.0] * 4, 2) == pytest.approx(0.75, abs=0.045)


def test_overall_is_the_mean_over_benchmarks_not_over_questions():
    """One benchmark with 1 question (mean@8 = 1), one with 3 (mean@8 = 0): overall 0.5,
    where the question-weighted mean would be 0.25."""
    rows = {"frames": {"questions": 1, "mean@8": 1.0}, "docmath": {"questions": 3, "mean@8": 0.0},
            "all": {"questions": 4, "mean@8": 0.25}}
    overall = mean_over_benchmarks(rows, ["mean@8"])
    assert overall == {"benchmarks": 2, "questions": 4, "mean@8": 0.5}


def test_evaluate_reports_mean_best_pass_and_overall(tmp_path, monkeypatch):
    from spell_core.evaluation.benchmarks import EvalItem
    from spell_core.eval import evaluate

    items = [EvalItem(Task("doc_qa", f"Q{i}?", "Duncan"), ("d",), f"f:{i}", str(i), src)
             for i, src in enumerate(["a", "b", "b", "b"])]
    # benchmark a: its one question 1 of 8 right; benchmark b: nothing right
    def generate(model, tok, prompts, n, **kwargs):
        return [[SimpleNamespace(text="The correct answer is " + ("Duncan" if i == 0 and j == 0 else "Banquo"),
                                 token_ids=[1]) for j in range(n)] for i in range(len(prompts))]

    tokenizer = SimpleNamespace()
    monkeypatch.setattr("spell_core.evaluation.harness.build_eval_prompt",
                        lambda tok, docs, task, template_kwargs=None: SimpleNamespace(input_ids=[1, 2, 3],
                                                                                        text=task.question))
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    result = evaluate(model, tokenizer, items, n=8, ks=(1, 8), max_new_tokens=16, generate=generate, progress=False)
    first = result["questions"][0]
    assert first["mean@8"] == 0.125 and first["pass@8"] == 1.0 and first["best@8"] == pytest.approx(0.656, abs=0.05)
    assert result["sources"]["a"]["mean@8"] == 0.125 and result["sources"]["b"]["mean@8"] == 0.0
    assert result["overall"]["mean@8"] == pytest.approx(0.0625)  # (0.125 + 0) / 2 benchmarks
    assert result["sources"]["all"]["mean@8"] == pytest.approx(0.125 / 4)  # question-weighted


# --- evaluation judge ----------------------------------------------------------------------


def test_judge_is_fed_as_released():
    assert judged_text("I cannot tell.", None) == "None"  # str(None), was the response's last 2000 chars
    assert judged_text("<think>still thinking", None) == "None"  # was: not judged at all
    assert judged_text("The correct answer is Duncan", "Duncan") == "Duncan"
    assert JUDGE_MAX_NEW_TOKENS == 8192 and Judge(None, None, "j").max_new_tokens == 8192
    from spell_core.eval import build_parser
    assert build_parser().parse_args([]).judge_max_new_tokens == 8192  # was 1024
    # released eval/verify.py: YES iff "YES" and no "NO" in the reply
    assert parse_judge_verdict("Decision: [[YES]]") is True
    assert parse_judge_verdict("[[YES]], NOT a paraphrase") is False
    assert parse_judge_verdict("Hmm.") is False


def test_judge_decodes_greedily_with_its_token_budget():
    from transformers import AutoTokenizer

    from spell_core.models.assets import resolve_model

    calls = []

    def generate(model, tok, prompts, **kwargs):
        calls.append(kwargs)
        return [[SimpleNamespace(text="[[YES]]")] for _ in prompts]

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=32768))
    judge = Judge(model, AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")), "j")
    assert judge.verdicts([(Task("doc_qa", "Q?", "A"), "None")], generate=generate) == [True]
    assert calls[0]["temperature"] == 0.0 and calls[0]["max_new_tokens"] == 8192


# --- task per cluster ----------------------------------------------------------------------


def _clusters(n, tasks):
    return [SimpleNamespace(id=f"{'+'.join(tasks)}#{i}", tasks=tasks) for i in range(n)]


def test_each_source_splits_its_clusters_between_its_tasks_once():
    """10 web clusters for doc_qa and doc_mc: array_split sizes 5 and 5, disjoint; 7 math
    clusters all for doc_math. Worked by hand: split_sizes(7, 3) = [3, 2, 2]."""
    assert split_sizes(7, 3) == [3, 2, 2] and split_sizes(10, 2) == [5, 5]
    web, math = _clusters(10, ("doc_qa", "doc_mc")), _clusters(7, ("doc_math",))
    mix = TaskMix(web + math, random.Random(0))
    assert len(mix.pools["doc_qa"]) == len(mix.pools["doc_mc"]) == 5
    assert not set(mix.pools["doc_qa"]) & set(mix.pools["doc_mc"])
    assert sorted(mix.pools["doc_math"]) == sorted(c.id for c in math)
    for _ in range(6):  # every round: the same cluster always gets the same task type
        for cluster, task in mix.draw(9):
            assert cluster.id in mix.pools[task]


def test_equal_prompts_per_task_and_no_repeat_within_a_round():
    """480 questions over 3 task types: 160 each, whatever the corpus sizes (100 web clusters,
    1000 math clusters); within a round no cluster repeats (pools of 50, 50 and 1000 >= 160? no:
    the web pools hold 50, so a round cycles them: each cluster 3 or 4 times, never 5)."""
    mix = TaskMix(_clusters(100, ("doc_qa", "doc_mc")) + _clusters(1000, ("doc_math",)), random.Random(1))
    picks = mix.draw(480)
    counts = {t: sum(task == t for _, task in picks) for t in ("doc_qa", "doc_math", "doc_mc")}
    assert counts == {"doc_qa": 160, "doc_math": 160, "doc_mc": 160}
    math_ids = [c.id for c, t in picks if t == "doc_math"]
    assert len(set(math_ids)) == 160  # without replacement (drawing with replacement repeats: birthday)
    # 8 questions over 3 types: 3, 3, 2 (remainder to the first types)
    assert sorted(sum(t == x for _, t in mix.draw(8)) for x in ("doc_qa", "doc_math", "doc_mc")) == [2, 3, 3]


def test_a_pool_is_drawn_without_replacement_across_rounds():
    """Pool of 6 doc_math clusters, 3 a round: two rounds see all 6 once."""
    mix = TaskMix(_clusters(6, ("doc_math",)), random.Random(2))
    seen = [c.id for c, _ in mix.draw(3)] + [c.id for c, _ in mix.draw(3)]
    assert sorted(seen) == sorted(f"doc_math#{i}" for i in range(6))


# --- loss weighting ------------------------------------------------------------------------


def test_released_micro_batch_weights_worked_by_hand():
    """Three sequences: prompts 20000, 20000, 500; responses 100, 300, 50. Total 40,950 tokens
    -> ceil(40950 / 32000) = 2 micro-batches: {20300} and {20100, 550}. Weights w = (sequences in
    the micro-batch / 3) / (its response tokens): 1/3 / 300 for the second, 2/3 / 150 for the others.
    Shares of the summed weight: 1/3, 100 x 2/450 = 0.444, 50 x 2/450 = 0.222 (token-mean: 100/450,
    300/450, 50/450)."""
    prompts, responses = [20000, 20000, 500], [100, 300, 50]
    assert released_micro_batches([p + r for p, r in zip(prompts, responses)]) == [[1], [0, 2]]
    w = trajectory_token_weights(prompts, responses, "released")
    assert w == pytest.approx([2 / 3 / 150, 1 / 3 / 300, 2 / 3 / 150])
    assert sum(r * x for r, x in zip(responses, w)) == pytest.approx(1.0)
    shares = role_shares(["a", "b", "c"], responses, w)
    assert shares == pytest.approx({"a": 4 / 9, "b": 1 / 3, "c": 2 / 9})
    assert trajectory_token_weights(prompts, responses, "token-mean") == pytest.approx([1 / 450] * 3)
    assert trajectory_token_weights(prompts, responses, "seq-mean-token-mean") == pytest.approx(
        [1 / 300, 1 / 900, 1 / 150])
    # everything in one micro-batch (a CPU-default step): released is the token-mean
    assert trajectory_token_weights([900, 900], [10, 30], "released") == pytest.approx([1 / 40, 1 / 40])


def test_released_loss_does_not_depend_on_our_micro_batch_size(monkeypatch):
    """The released weighting, rebuilt over 40-token 'released' micro-batches, gives the same
    loss and gradients whether our own micro-batches hold 24 tokens or everything; and it
    differs from the token-mean (so the micro-batch rebuild is really in effect)."""
    monkeypatch.setattr(loss_weights, "RELEASED_MAX_TOKEN_LEN", 40)
    hf, _ = tiny_models()
    trajectories = synthetic_batch(hf)

    def run(agg, budget):
        _, ours = tiny_models()
        metrics = Trainer(ours, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=budget, agg=agg)
                          ).accumulate_gradients(trajectories)
        return metrics["loss"], torch.cat([p.grad.flatten() for p in ours.parameters()])

    small, large, token_mean = run("released", 24), run("released", 100000), run("token-mean", 24)
    assert small[0] == pytest.approx(large[0], rel=1e-9)
    torch.testing.assert_close(small[1], large[1], rtol=1e-5, atol=1e-7)  # attention order
    assert abs(small[0] - token_mean[0]) > 1e-6


def test_released_equals_token_mean_when_everything_fits_one_released_micro_batch():
    hf, _ = tiny_models()
    trajectories = synthetic_batch(hf)
    out = []
    for agg in ("released", "token-mean"):
        _, ours = tiny_models()
        out.append(Trainer(ours, TrainerOptions(temperature=TEMPERATURE, micro_batch_tokens=24, agg=agg)
                           ).accumulate_gradients(trajectories)["loss"])
    assert out[0] == pytest.approx(out[1], rel=1e-9)


def test_run_defaults_to_the_released_loss_weighting():
    from spell_core.run import build_parser, trainer_options

    args = build_parser().parse_args(["--device", "cpu"])
    assert args.loss_agg is None
    options = trainer_options(SimpleNamespace(sampling=SimpleNamespace(temperature=0.7)), args)
    assert options.agg is None  # the Trainer picks: released on one process, token-mean on several ranks
    assert Trainer(tiny_models()[1], options).options.agg == "released"
    args = build_parser().parse_args(["--loss-agg", "token-mean"])
    assert args.loss_agg == "token-mean"


def test_task_mix_state_round_trips():
    clusters = _clusters(6, ("doc_qa", "doc_mc"))
    mix = TaskMix(clusters, random.Random(3))
    mix.draw(2)
    state = mix.state_dict()
    again = TaskMix(clusters, random.Random(99))
    again.load_state_dict(state)
    assert [(c.id, t) for c, t in again.draw(4)] == [(c.id, t) for c, t in mix.draw(4)]
