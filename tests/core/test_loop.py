"""One self-play step on a tiny random Llama and a tiny corpus.

The scenario test scripts every model output (tests/core/scripted.py) so that each rule of
SPEC.md's "What trains" is hit by a known case; expected rewards and advantages are worked
by hand here (Gaussian questioner reward, unbiased z-scores). The last test runs the real
sampler on the random model: whatever it writes, the step must not raise.
"""
import collections
import math
import re
import statistics

import pytest

from spell_core.selfplay.config import RunConfig
from spell_core.data.documents import build_clusters, load_documents
from spell_core.selfplay.loop import SelfPlay, StepAbandoned, packed_token_counts
from spell_core.models.model import load_pretrained
from spell_core.roles import Status
from tests.core.scripted import make_tiny_corpus, make_tiny_model, scripted_generate

G = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from spell_core.models.assets import resolve_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-model"), resolve_model("smollm2-135m-instruct"))
    corpus = make_tiny_corpus(tmp_path_factory.mktemp("corpus") / "c")
    model, tokenizer = load_pretrained(folder)
    clusters = build_clusters(load_documents(corpus), tokenizer, 2048)
    return model, tokenizer, clusters


def config(**loop):
    cfg = RunConfig()
    cfg.data.ctx = 4096
    cfg.sampling.group_size = G
    cfg.sampling.max_response_tokens = 64
    cfg.loop.questions = 8
    cfg.loop.kept_groups = 8
    cfg.loop.max_rounds = 1
    for key, value in loop.items():
        setattr(cfg.loop, key, value)
    return cfg


def _json(case, answer="lantern"):
    return f'Let me think.\n```json\n{{"question": "Which object marks case {case}?", "answer": "{answer}"}}\n```'


# case -> the G responder answers (None: no "the answer is")
ANSWERS = {
    2: ["lantern"] * G,
    4: ["lantern"] * G,  # all right: r = 1, zero variance
    5: ["torch"] * G,  # all wrong: r = 0, zero variance
    6: ["lantern", "lantern", "candle", "torch"],
    7: ["lantern", "candle", None, "torch"],
}
# (case, answer) -> the G verdicts (None: unparsable)
VERDICTS = {
    (4, "lantern"): ["YES"] * G,
    (5, "torch"): ["NO"] * G,
    (6, "lantern"): ["YES"] * G,  # agreement 1.0 > 0.99: not trained
    (6, "candle"): ["YES", "YES", "YES", "NO"],  # majority 1 but rule 0: not trained; raises r to 1
    (6, "torch"): ["NO", "NO", None, "YES"],  # majority 0 = rule, agreement 2/3 over parsable: candidate
    (7, "lantern"): ["YES", "YES", "YES", "NO"],  # majority 1 = rule, agreement 0.75: candidate
    (7, "candle"): [None, None, "YES", "NO"],  # plurality unparsable (2) -> r = rule = 0
    (7, "torch"): ["NO"] * G,
}


def scenario(role, text, i, j, rng):
    if role == "questioner":
        return {0: "I cannot write JSON.", 1: '```json\n{"question": "Which?"}\n```',
                3: "<think>still thinking"}.get(i, _json(i))
    case = int(re.search(r"marks case (\d+)", text).group(1))
    if role == "grounding":
        return "The answer is lantern" if case == 2 else "The answer is unknown."
    if role == "responder":
        answer = ANSWERS[case][j]
        return "I am not sure." if answer is None else f"Reading closely. The answer is {answer}."
    answer = re.search(r"Answer to grade: (.*)", text).group(1).strip().rstrip(".")
    verdict = VERDICTS[(case, answer)][j]
    return "Hmm, hard to say." if verdict is None else f"Compared. [[{verdict}]]"


def gaussian(mean):
    return math.exp(-((mean - 0.5) ** 2) / (2 * (0.5 / 3) ** 2))


def zscores(values):
    mean, std = statistics.fmean(values), statistics.stdev(values)
    return [(v - mean) / (std + 1e-6) for v in values]


@pytest.fixture
def doc_qa_only(tiny, monkeypatch):
    for cluster in tiny[2]:  # clusters that allow doc_qa only: the questioner asks nothing else
        monkeypatch.setattr(cluster, "tasks", ("doc_qa",))


def run_scenario(tiny, calls=None, **loop):
    model, tokenizer, clusters = tiny
    play = SelfPlay(model, tokenizer, clusters, config(**loop), generate=scripted_generate(scenario, calls=calls))
    return play, play.step()


def by_role(result, role):
    return [t for t in result.trajectories if t.role == role]


def test_statuses_rewards_and_what_trains(tiny, doc_qa_only):
    calls = []
    play, result = run_scenario(tiny, calls, verifier_share=2.0)
    q = {int(x.id.rsplit("q", 1)[1]): x for x in result.questions}
    assert [q[i].status for i in range(8)] == [Status.BAD_FORMAT, Status.BAD_FORMAT, Status.BAD_GROUND,
                                                Status.DISCARDED] + [Status.OK] * 4
    assert [q[i].reward for i in range(4)] == [-1.0, -1.0, -0.5, None]
    assert q[4].responder.rewards == [1.0] * 4 and q[4].reward == 0.0
    assert q[5].responder.rewards == [0.0] * 4 and q[5].reward == 0.0
    # case 6: the verifier's YES majority lifts "candle" to 1 (r = max(rule, v))
    assert q[6].responder.rule_rewards == [1, 1, 0, 0] and q[6].responder.rewards == [1, 1, 1, 0]
    # case 7: an unparsable plurality leaves "candle" at its rule reward; the unparsable answer is never judged
    assert q[7].responder.rewards == [1, 0, 0, 0] and len(q[7].verifiers) == 3
    assert q[6].reward == pytest.approx(gaussian(0.75)) == pytest.approx(0.3247, abs=1e-4)
    assert q[7].reward == pytest.approx(gaussian(0.25))

    # one generate call per stage, in order, with all its prompts: G samples for responder and verifier
    assert [(role, len(prompts), n) for role, prompts, n, _ in calls] == [
        ("questioner", 8, 1), ("grounding", 5, 1), ("responder", 4, G), ("verifier", 15, G)]

    # responder: only the groups with reward variance (cases 6 and 7), GRPO z-scores by hand
    responder = by_role(result, "responder")
    assert [t.group for t in responder] == [f"resp:{q[6].id}"] * 4 + [f"resp:{q[7].id}"] * 4
    assert [t.advantage for t in responder[:4]] == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-5)
    assert [t.advantage for t in responder] == pytest.approx(zscores([1, 1, 1, 0]) + zscores([1, 0, 0, 0]))
    assert all(t.prompt_ids == q[6].responder.prompt_ids for t in responder[:4])

    # questioner: 2 positives + as many negatives (of bad_format, bad_ground, zero variance)
    questioner = by_role(result, "questioner")
    statuses = [t.info["status"] for t in questioner]
    assert len(questioner) == 4 and statuses.count("ok") >= 2
    positives = [t for t in questioner if t.group in (f"q:{q[6].id}", f"q:{q[7].id}")]
    negatives = [t for t in questioner if t not in positives]
    assert len(positives) == 2 and len(negatives) == 2
    negative_pool = {f"q:{q[i].id}": q[i].reward for i in (0, 1, 2, 4, 5)}
    assert all(t.group in negative_pool and t.reward == negative_pool[t.group] for t in negatives)
    assert [t.advantage for t in questioner] == pytest.approx(zscores([t.reward for t in questioner]))

    # verifier: candidates are (6, torch) and (7, lantern); target = 2.0 x 2 positives -> floor(4/4) = 1 group
    verifier = by_role(result, "verifier")
    assert len(verifier) == G and len({t.group for t in verifier}) == 1
    assert verifier[0].group in (f"ver:{q[6].id}:3", f"ver:{q[7].id}:0")
    expected = [1.0, 1.0, -1.0, 0.0] if verifier[0].group.endswith(":3") else [1.0, 1.0, 1.0, 0.0]
    assert [t.reward for t in verifier] == expected
    assert [t.advantage for t in verifier] == pytest.approx(zscores(expected))

    # what the sampler returned is what trains
    for t in result.trajectories:
        assert t.old_logprobs == [-0.5] * len(t.response_ids)

    m = result.metrics
    assert m["pass_rate_histogram"] == [1, 1, 0, 1, 1]  # cases 5, 7, -, 6, 4 by k of G rewarded
    assert (m["questions_bad_format"], m["questions_bad_ground"], m["questions_discarded"], m["questions_ok"]) == \
        (2, 1, 1, 4)
    assert (m["kept_groups"], m["zero_variance_groups"], m["verifier_candidates"], m["verifier_kept_groups"]) == \
        (2, 2, 2, 1)
    assert m["reward_responder"] == pytest.approx((4 + 0 + 3 + 1) / 16)
    assert m["tokens_generated_responder"] == sum(len(s.token_ids) for i in (4, 5, 6, 7)
                                                  for s in q[i].responder.samples)
    assert m["nothing_trainable"] is False

    # history memory, released admission (the default): 0.01 <= mean reward <= 1, so case 4 (all
    # right, r = 1) enters with 6 (r = 3/4) and 7 (r = 1/4); case 5 (r = 0) does not
    entries = [e for key in {(x.cluster_id, "doc_qa") for x in result.questions}
               for e in play.memory.entries(*key)]
    assert sorted(e.question for e in entries) == [f"Which object marks case {c}?" for c in (4, 6, 7)]


def test_overlapped_grounding_samples_once_and_ends_as_the_separate_stages(tiny, doc_qa_only):
    """overlap_grounding: the 5 grounding prompts and the 5 responder prompts (the bad_ground
    question's too) in one call; the rejected question's answers are dropped, nothing else differs."""
    _, separate = run_scenario(tiny)
    calls = []
    _, overlapped = run_scenario(tiny, calls, overlap_grounding=True)
    assert [(role, len(prompts), n) for role, prompts, n, _ in calls] == [
        ("questioner", 8, 1), ("grounding", 10, [1] * 5 + [G] * 5), ("verifier", 15, G)]
    assert len({tuple(p) for p in calls[1][1][5:]}) == 5  # five distinct responder prompts after the grounding ones
    for a, b in zip(separate.questions, overlapped.questions):
        assert (a.status, a.reward) == (b.status, b.reward)
        assert (a.responder is None) == (b.responder is None)
        if a.responder is not None:
            assert (a.responder.rewards, a.responder.prompt_ids) == (b.responder.rewards, b.responder.prompt_ids)
    assert overlapped.questions[2].status == Status.BAD_GROUND and overlapped.questions[2].responder is None
    # one sampling call fewer draws one seed fewer from the loop's rng, which also subsamples the
    # questioner's negatives: compare the responders exactly and the other roles by count
    assert [(t.group, t.advantage) for t in by_role(separate, "responder")] == \
        [(t.group, t.advantage) for t in by_role(overlapped, "responder")]
    assert [len(by_role(r, role)) for r in (separate, overlapped) for role in ("questioner", "verifier")] == [
        len(by_role(separate, "questioner")), len(by_role(separate, "verifier"))] * 2
    assert overlapped.metrics["time_grounding_s"] == overlapped.metrics["time_responder_s"] == 0.0
    assert overlapped.metrics["tokens_prompt_ground_respond"] == sum(len(p) for p in calls[1][1])


def test_questioner_asks_only_and_equally_the_clusters_task_types(tiny, monkeypatch):
    for cluster in tiny[2]:
        monkeypatch.setattr(cluster, "tasks", ("doc_math", "doc_mc"))
    _, result = run_scenario(tiny, questions=40)  # the scripted QA-style JSON: bad_format / discarded here
    counts = collections.Counter(q.task_type for q in result.questions)
    # as released (docs/fidelity.md, selfplay/task_mix.py): every round asks n // T prompts of each of
    # the T types, so 40 questions over two types are exactly 20 and 20, whatever the seed
    assert counts == {"doc_math": 20, "doc_mc": 20}


THINK_OFF = "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("enable_thinking, ends_with_empty_think", [(False, True), (True, False), (None, False)])
def test_enable_thinking_reaches_the_chat_template_of_every_role(tiny, doc_qa_only, monkeypatch, enable_thinking,
                                                                 ends_with_empty_think):
    """A Qwen3-style template: `enable_thinking=false` pre-fills an empty reasoning block."""
    tokenizer = tiny[1]
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        + THINK_OFF + "{% endif %}"))
    calls = []
    run_scenario(tiny, calls, enable_thinking=enable_thinking)
    assert {role for role, *_ in calls} == {"questioner", "grounding", "responder", "verifier"}
    for role, prompts, *_ in calls:
        for prompt in prompts:
            assert tokenizer.decode(prompt).endswith(THINK_OFF) is ends_with_empty_think, role


def test_paper_memory_admission_keeps_only_intermediate_rewards(tiny, doc_qa_only):
    play, result = run_scenario(tiny, memory_admission="paper")
    entries = [e for key in {(x.cluster_id, "doc_qa") for x in result.questions}
               for e in play.memory.entries(*key)]
    assert sorted(e.question for e in entries) == [f"Which object marks case {c}?" for c in (6, 7)]


def test_negatives_ratio_and_verifier_share_are_honoured(tiny, doc_qa_only):
    _, result = run_scenario(tiny, negatives_ratio=1.5, verifier_share=4.0)
    questioner = by_role(result, "questioner")
    assert len(questioner) == 2 + 3  # floor(1.5 x 2) negatives
    verifier = by_role(result, "verifier")
    assert len({t.group for t in verifier}) == 2  # target 8 trajectories = both candidate groups
    _, result = run_scenario(tiny, verifier_share=1.0)  # floor(2 / 4) = 0 groups at the default share
    assert by_role(result, "verifier") == []
    _, result = run_scenario(tiny, verifier_share=6.0)  # 3 groups wanted, 2 candidates: none (as released)
    assert by_role(result, "verifier") == []
    _, result = run_scenario(tiny, negatives_ratio=10.0, verifier_share=0.0)
    assert len(by_role(result, "questioner")) == 2 + 5  # the pool holds 5 negatives
    assert by_role(result, "verifier") == []


def test_kept_groups_cap_and_agreement_window(tiny, doc_qa_only):
    _, result = run_scenario(tiny, kept_groups=1)
    assert {t.group for t in by_role(result, "responder")} == {f"resp:{result.questions[6].id}"}
    # widen the window to 1.0: the unanimous groups whose majority equals the rule become candidates too
    _, result = run_scenario(tiny, agreement_high=1.0)
    # + 4 x (4, lantern), 4 x (5, torch), 2 x (6, lantern), (7, torch)
    assert result.metrics["verifier_candidates"] == 2 + 11


def test_generation_rounds_continue_until_enough_groups(tiny, doc_qa_only):
    calls = []
    _, result = run_scenario(tiny, calls, kept_groups=3, max_rounds=3)
    assert result.metrics["rounds"] == 2  # 2 kept groups per round
    assert result.metrics["kept_groups"] == 3
    assert [c[0] for c in calls].count("questioner") == 2


def test_nothing_trainable_when_every_question_is_malformed(tiny):
    model, tokenizer, clusters = tiny
    play = SelfPlay(model, tokenizer, clusters, config(), generate=scripted_generate(lambda *a: "no json"))
    result = play.step()
    assert result.trajectories == [] and result.metrics["nothing_trainable"] is True
    assert result.metrics["questions_bad_format"] == 8 and result.metrics["reward_questioner"] == -1.0


def test_state_dict_round_trip_reproduces_the_next_step(tiny, doc_qa_only):
    model, tokenizer, clusters = tiny
    first = SelfPlay(model, tokenizer, clusters, config(), generate=scripted_generate(scenario))
    first.step()
    state = first.state_dict()
    second = SelfPlay(model, tokenizer, clusters, config(), generate=scripted_generate(scenario))
    second.load_state_dict(state)
    a, b = first.step(), second.step()
    assert [(t.prompt_ids, t.response_ids, t.advantage) for t in a.trajectories] == \
        [(t.prompt_ids, t.response_ids, t.advantage) for t in b.trajectories]
    assert len(first.memory) == len(second.memory) > 0


def test_stop_request_abandons_the_step(tiny, doc_qa_only):
    model, tokenizer, clusters = tiny
    stages = []

    def should_stop():
        return len(stages) >= 1

    class Observer:
        def stage(self, name, prompts, samples):
            stages.append(name)
            import contextlib
            return contextlib.nullcontext(None)

    play = SelfPlay(model, tokenizer, clusters, config(), generate=scripted_generate(scenario),
                    observer=Observer(), should_stop=should_stop)
    with pytest.raises(StepAbandoned, match="questioner"):
        play.step()


def test_packed_token_counts_share_each_prompt_once(tiny, doc_qa_only):
    _, result = run_scenario(tiny)
    packed, unpacked = packed_token_counts(result.trajectories)
    assert unpacked == sum(len(t.prompt_ids) + len(t.response_ids) for t in result.trajectories)
    groups = {}
    for t in result.trajectories:
        groups.setdefault(tuple(t.prompt_ids), []).append(t)
    saved = sum(len(p) * (len(ts) - 1) for p, ts in groups.items())
    assert packed == unpacked - saved and saved > 0


def test_one_step_with_the_real_sampler_never_raises(tiny):
    """Random weights write garbage: every rule must cope (mostly bad_format), with real
    sampler log-probs for whatever trains."""
    model, tokenizer, clusters = tiny
    cfg = config(questions=3)
    cfg.sampling.max_response_tokens = 12
    play = SelfPlay(model, tokenizer, clusters, cfg)
    result = play.step()
    assert result.metrics["questions"] == 3
    assert sum(result.metrics[f"questions_{s}"] for s in ("ok", "bad_format", "bad_ground", "discarded")) == 3
    assert result.metrics["tokens_generated_questioner"] > 0
    for t in result.trajectories:
        assert len(t.old_logprobs) == len(t.response_ids) and all(lp <= 0 for lp in t.old_logprobs)


def test_loop_defaults_follow_spec():
    loop = RunConfig().loop
    assert (loop.kept_groups, loop.memory_capacity, loop.new_documents) == (128, 3, 5)  # N, L, m
    assert (loop.agreement_low, loop.agreement_high, loop.negatives_ratio, loop.verifier_share) == (0.51, 0.99, 1, 1)
    assert loop.verifier_group_size is None and RunConfig().sampling.group_size == 8  # G for both roles
    assert (loop.questioner_reward, loop.advantage_eps) == ("gaussian", 1e-6)
    assert all(getattr(loop, f"{role}_tokens") is None for role in ("questioner", "grounding", "responder", "verifier"))


def test_bad_loop_options_are_refused(tiny):
    model, tokenizer, clusters = tiny
    for field, value, message in [("questions", 0, "questions must be a positive integer"),
                                  ("agreement_low", 0.995, "agreement_low <= agreement_high"),
                                  ("negatives_ratio", -1.0, "must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            SelfPlay(model, tokenizer, clusters, config(**{field: value}))
    with pytest.raises(ValueError, match="at least one document cluster"):
        SelfPlay(model, tokenizer, [], config())


@pytest.mark.parametrize("chosen", [True, False])
def test_the_loop_decodes_with_the_cuda_graph_when_it_is_chosen(tiny, doc_qa_only, monkeypatch, chosen):
    """On CUDA choose_cuda_graph says yes by default (tests/core/test_cuda_graph_choice.py); every
    generation of the step then asks the sampler for the graph, and none does when it says no."""
    from spell_core.sampling import decode_graph

    asked = []
    monkeypatch.setattr(decode_graph, "choose_cuda_graph", lambda model, requested, warn=None: asked.append(requested)
                        or chosen)
    seen = []
    script = scripted_generate(scenario)

    def generate(*args, **kwargs):
        seen.append(kwargs.get("cuda_graph", False))
        return script(*args, **kwargs)

    model, tokenizer, clusters = tiny
    SelfPlay(model, tokenizer, clusters, config(cuda_graph=None), generate=generate).step()
    assert asked == [None] and len(seen) >= 3 and set(seen) == {chosen}
