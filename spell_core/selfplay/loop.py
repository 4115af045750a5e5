"""One SPELL step: documents -> questions -> answers -> verdicts -> rewards -> a training batch.

    play = SelfPlay(model, tokenizer, clusters, config)
    result = play.step()          # result.trajectories -> Trainer.train_step, result.metrics -> monitor

A step runs generation rounds until N responder groups with non-zero reward variance are
collected (or `max_rounds` is reached). Each round:
  1. `questions` (cluster, task type) pairs, the same number per task type, each type's
     clusters drawn without replacement from its share of its source (`task_mix.py`, as
     released); the questioner sees the documents the history memory selects and the
     remembered questions;
  2. questioner, 1 sample each -> parse: bad_format (penalised), discarded (dropped);
  3. grounding: the responder prompt with the documents replaced by "Empty", 1 sample; rule
     reward 1 -> bad_ground (penalised);
  4. responder: G samples over ALL documents of the cluster (one prompt, so one prefill);
  5. verifier: G judgments of every parsable answer (question, answer, reference);
  6. rewards (roles/rewards.py) and the history memory update.
Every stage is one `generate` call over all its prompts. Then `selection.py` picks what
trains and advantages come from `spell_kernels.group_advantages` (responder and verifier:
GRPO within their groups of G; questioner: normalised per task type over its batch).
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import spell_kernels
from spell_core.selfplay.batch import Trajectory
from spell_core.selfplay.config import RunConfig
from spell_core.models.routed_tokens import expert_load_metrics
from spell_core.selfplay.memory import HistoryMemory, MemoryEntry, evidence_ids
from spell_core.roles import (TASK_TYPES, Status, answered_without_documents, build_grounding_prompt,
                              build_questioner_prompt, build_responder_prompt, build_verifier_prompt, extract_answer,
                              parse_questioner_output, parse_verdict, questioner_reward, responder_reward, rule_reward,
                              shuffle_options, thinking_template_kwargs, token_counter, verifier_majority,
                              verifier_rewards)
from spell_core.selfplay.rollout import Question, ResponderGroup, Sample, VerifierGroup
from spell_core.selfplay.task_mix import TaskMix
from spell_core.selfplay.selection import (kept_responder_groups, select_questions, select_verifier_groups,
                                  verifier_candidates)

# "ground_respond": grounding and responder sampled together (LoopOptions.overlap_grounding)
STAGES = ("questioner", "grounding", "responder", "ground_respond", "verifier")


class StepAbandoned(Exception):
    """Raised inside a step when `should_stop()` turns true: the step is dropped, nothing trains."""


@dataclass
class StepResult:
    trajectories: list[Trajectory]
    metrics: dict
    questions: list[Question]  # everything generated, for inspection


class _NoProgress:
    def stage(self, name: str, prompts: int, samples: int):
        return contextlib.nullcontext(None)


class SelfPlay:
    """The self-play state between steps (history memory, random generator, step count) and
    the step itself. `generate` defaults to `spell_core.sampling.sampler.generate` (looked up at each
    call); `observer.stage(name, prompts, samples)` is a context manager giving the sampler's
    progress hook (see monitor.py); `should_stop()` is polled during generation."""

    def __init__(self, model, tokenizer, clusters: Sequence, config: RunConfig | None = None, *,
                 generate: Callable | None = None, observer=None, should_stop: Callable[[], bool] | None = None):
        if not clusters:
            raise ValueError("self-play needs at least one document cluster")
        self.model, self.tokenizer, self.clusters = model, tokenizer, list(clusters)
        self.config = config = config or RunConfig()
        self.options = config.loop
        _check_options(config)
        self.memory = HistoryMemory(self.options.memory_capacity, self.options.new_documents,
                                    self.options.memory_admission)
        self.rng = random.Random(config.seed)
        self.task_mix = TaskMix(self.clusters, random.Random(f"task-mix-{config.seed}"))
        self.steps_done = 0
        self._generate_fn = generate
        self.observer = observer or _NoProgress()
        self.should_stop = should_stop or (lambda: False)
        self._count_tokens = token_counter(tokenizer)
        self._template = thinking_template_kwargs(tokenizer, self.options.enable_thinking)

    def _use_cuda_graph(self) -> bool:
        """Decided once, at the first generation (the model's RoPE is final by then)."""
        if not hasattr(self, "_cuda_graph"):
            from spell_core.sampling.decode_graph import choose_cuda_graph
            self._cuda_graph = choose_cuda_graph(self.model, self.options.cuda_graph,
                                                 warn=lambda line: print(line, file=sys.stderr))
        return self._cuda_graph

    @property
    def _ctx(self) -> int:
        return self.model.config.max_position_embeddings

    # --- state for checkpoints -----------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-able: the history memory, the random generator and the step count."""
        version, internal, gauss = self.rng.getstate()
        return {"memory": self.memory.to_dict(), "rng": [version, list(internal), gauss],
                "steps_done": self.steps_done, "task_mix": self.task_mix.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory = HistoryMemory.from_dict(state["memory"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.steps_done = int(state["steps_done"])
        saved = state.get("task_mix")
        # checkpoints from before the per-task split, or over other clusters, keep the fresh split
        if saved and all(cid in self.task_mix.by_id for ids in saved["pools"].values() for cid in ids):
            self.task_mix.load_state_dict(saved)

    # --- the step --------------------------------------------------------------------------

    def step(self) -> StepResult:
        opts = self.options
        stats = _StepStats()
        questions: list[Question] = []
        rounds = 0
        expert_load_metrics(self.model)  # an MoE model's expert counts restart: this step's sampling only
        while rounds < opts.max_rounds:
            questions += self._round(rounds, stats)
            rounds += 1
            if len(kept_responder_groups(questions, opts.kept_groups)) >= opts.kept_groups:
                break
        trajectories, selection = self._select(questions)
        metrics = self._metrics(questions, trajectories, selection, stats, rounds)
        self.steps_done += 1
        return StepResult(trajectories, metrics, questions)

    def _round(self, round_index: int, stats: "_StepStats") -> list[Question]:
        questions, clusters = self._ask(round_index, stats)
        if self.options.overlap_grounding:
            self._ground_and_answer([q for q in questions if q.status == Status.OK], clusters, stats)
        else:
            self._ground([q for q in questions if q.status == Status.OK], stats)
            self._answer([q for q in questions if q.status == Status.OK], clusters, stats)
        self._verify([q for q in questions if q.responder is not None], stats)
        self._reward(questions)
        return questions

    def _ask(self, round_index: int, stats: "_StepStats") -> tuple[list[Question], dict]:
        """Questioner: one sample per (cluster, task type) drawn; parsed into tasks."""
        picks, shown, prompts = [], [], []
        for cluster, task_type in self.task_mix.draw(self.options.questions):
            documents = self.memory.select_documents(cluster, task_type, self.rng)
            history = self.memory.entries(cluster.id, task_type)
            prompt = build_questioner_prompt(self.tokenizer, documents, task_type, history,
                                             template_kwargs=self._template).input_ids
            if len(prompt) >= self._ctx:  # only with very long remembered questions: skip the pick
                stats.too_long += 1
                continue
            picks.append((cluster, task_type))
            shown.append(documents)
            prompts.append(prompt)
        outputs = self._generate("questioner", prompts, 1, self.options.questioner_tokens, stats)
        questions, clusters = [], {}
        for i, ((cluster, task_type), documents, prompt, out) in enumerate(zip(picks, shown, prompts, outputs)):
            parsed = parse_questioner_output(out[0].text, task_type, self._count_tokens)
            task = parsed.task
            if task is not None and self.options.shuffle_options:
                task = shuffle_options(task, self.rng)
            q = Question(f"s{self.steps_done}r{round_index}q{i}", task_type, cluster.id, evidence_ids(documents),
                         prompt, out[0], parsed.status, task, parsed.reason)
            questions.append(q)
            clusters[q.id] = cluster
        return questions, clusters

    def _ground(self, questions: list[Question], stats: "_StepStats") -> None:
        """Grounding filter: a question the model answers right without the documents is bad_ground."""
        prompts = self._grounding_prompts(questions)
        self._judge_grounding(questions, self._generate("grounding", prompts, 1, self.options.grounding_tokens,
                                                        stats))

    def _grounding_prompts(self, questions: list[Question]) -> list[list[int]]:
        return [build_grounding_prompt(self.tokenizer, q.task, template_kwargs=self._template).input_ids
                for q in questions]

    def _judge_grounding(self, questions: list[Question], outputs: list[list[Sample]]) -> None:
        for q, out in zip(questions, outputs):
            if answered_without_documents(q.task, out[0].text):
                q.status, q.reason = Status.BAD_GROUND, "answered correctly without the documents"

    def _answer(self, questions: list[Question], clusters: dict, stats: "_StepStats") -> None:
        """Responder: G answers per question over ALL documents of its cluster (one prompt, one prefill)."""
        fitting = self._responder_prompts(questions, clusters, stats)
        outputs = self._generate("responder", [p for _, p in fitting], self.config.sampling.group_size,
                                 self.options.responder_tokens, stats)
        self._group_answers(fitting, outputs)

    def _ground_and_answer(self, questions: list[Question], clusters: dict, stats: "_StepStats") -> None:
        """The grounding filter and the responders in one sampling call; the groups of questions the
        filter rejects are dropped (LoopOptions.overlap_grounding)."""
        grounding = self._grounding_prompts(questions)
        fitting = self._responder_prompts(questions, clusters, stats)
        limits = {self.options.grounding_tokens, self.options.responder_tokens}
        if len(limits) > 1:
            raise ValueError(f"overlap_grounding samples grounding and responders together: grounding_tokens "
                             f"({self.options.grounding_tokens}) must equal responder_tokens "
                             f"({self.options.responder_tokens})")
        g = self.config.sampling.group_size
        outputs = self._generate("ground_respond", grounding + [p for _, p in fitting],
                                 [1] * len(grounding) + [g] * len(fitting), limits.pop(), stats)
        self._judge_grounding(questions, outputs[:len(grounding)])
        kept = [(pair, out) for pair, out in zip(fitting, outputs[len(grounding):]) if pair[0].status == Status.OK]
        self._group_answers([pair for pair, _ in kept], [out for _, out in kept])

    def _responder_prompts(self, questions: list[Question], clusters: dict,
                           stats: "_StepStats") -> list[tuple[Question, list[int]]]:
        """(question, responder prompt) of the questions whose prompt fits; the others are discarded."""
        fitting = []
        for q in questions:
            prompt = build_responder_prompt(self.tokenizer, clusters[q.id].documents, q.task,
                                            template_kwargs=self._template).input_ids
            if len(prompt) >= self._ctx:  # a question so long that documents + question overflow
                q.status, q.reason = Status.DISCARDED, f"responder prompt longer than the context ({self._ctx})"
                stats.too_long += 1
            else:
                fitting.append((q, prompt))
        return fitting

    def _group_answers(self, fitting: list[tuple[Question, list[int]]], outputs: list[list[Sample]]) -> None:
        g = self.config.sampling.group_size
        for (q, prompt), samples in zip(fitting, outputs):
            answers = [extract_answer(s.text, q.task.task_type) for s in samples]
            rules = [rule_reward(q.task, a) for a in answers]
            q.responder = ResponderGroup(q.id, prompt, samples, answers, rules, [None] * g, list(rules))

    def _verify(self, questions: list[Question], stats: "_StepStats") -> None:
        """Verifier: G judgments of every parsable answer (question, answer, reference; no documents)."""
        g = self.options.verifier_group_size or self.config.sampling.group_size
        judged = [(q, j) for q in questions for j, a in enumerate(q.responder.answers) if a is not None]
        prompts = [build_verifier_prompt(self.tokenizer, q.task, q.responder.answers[j],
                                         template_kwargs=self._template).input_ids for q, j in judged]
        for (q, j), prompt, samples in zip(judged, prompts, self._generate("verifier", prompts, g,
                                                                             self.options.verifier_tokens, stats)):
            verdicts = [parse_verdict(s.text) for s in samples]
            majority = verifier_majority(verdicts)
            q.verifiers.append(VerifierGroup(q.id, j, prompt, samples, verdicts, majority,
                                             q.responder.rule_rewards[j], verifier_rewards(verdicts, majority)))
            q.responder.majorities[j] = majority

    def _reward(self, questions: list[Question]) -> None:
        """Responder rewards max(rule, majority), questioner rewards, and the history memory update."""
        for q in questions:
            group = q.responder
            if group is None:
                q.reward = None if q.status in (Status.OK, Status.DISCARDED) else questioner_reward(None, q.status)
                continue
            group.rewards = [responder_reward(rule, v, parsable=a is not None)
                             for rule, v, a in zip(group.rule_rewards, group.majorities, group.answers)]
            q.reward = questioner_reward(group.mean_reward, q.status, scheme=self.options.questioner_reward)
            entry = MemoryEntry(q.evidence_ids, q.task.question, q.task.answer, q.task.options)
            self.memory.record(q.cluster_id, q.task_type, entry, group.mean_reward)

    def _generate(self, stage: str, prompts: list[list[int]], n: int | list[int], max_new_tokens: int | None,
                  stats: "_StepStats") -> list[list[Sample]]:
        if not prompts:
            return []
        sampling = self.config.sampling
        generate = self._generate_fn
        if generate is None:
            from spell_core.sampling import sampler
            generate = sampler.generate
        start, cpu_start = time.perf_counter(), time.process_time()
        kwargs = {}
        if self.options.kv_budget_tokens is not None:
            kwargs["kv_budget_tokens"] = self.options.kv_budget_tokens
        if self._use_cuda_graph():
            kwargs["cuda_graph"] = True
        samples_count = sum(n) if isinstance(n, list) else n * len(prompts)
        with self.observer.stage(stage, len(prompts), samples_count) as hook:
            def progress(event):
                if hook is not None:
                    hook(event)
                if self.should_stop():
                    raise StepAbandoned(f"stop requested during the {stage} stage")

            if self.should_stop():
                raise StepAbandoned(f"stop requested before the {stage} stage")
            outputs = generate(self.model, self.tokenizer, prompts, n=n,
                               max_new_tokens=max_new_tokens or sampling.max_response_tokens,
                               temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                               seed=self.rng.getrandbits(62), progress=progress, **kwargs)
        samples = [[Sample(list(c.token_ids), list(c.logprobs), c.text, c.finish_reason, getattr(c, "routing", None))
                    for c in out] for out in outputs]
        stats.add(stage, time.perf_counter() - start, sum(len(s.token_ids) for out in samples for s in out),
                  sum(len(p) for p in prompts), cpu_seconds=time.process_time() - cpu_start)
        return samples

    # --- what trains -----------------------------------------------------------------------

    def _select(self, questions: list[Question]) -> tuple[list[Trajectory], dict]:
        opts = self.options
        kept = kept_responder_groups(questions, opts.kept_groups)
        positives, negatives = select_questions(questions, kept, opts.negatives_ratio, self.rng)
        candidates = verifier_candidates([v for q in questions for v in q.verifiers], opts.agreement_low,
                                         opts.agreement_high)
        verifiers = select_verifier_groups(candidates, opts.verifier_share * len(positives), self.rng)
        eps = opts.advantage_eps

        trajectories: list[Trajectory] = []
        # questioner: one sample per prompt, normalised over the batch's samples of its task type
        chosen = positives + negatives
        advantages = {}
        for task_type in TASK_TYPES:
            of_type = [q for q in chosen if q.task_type == task_type]
            if of_type:
                adv = spell_kernels.group_advantages(torch.tensor([q.reward for q in of_type], dtype=torch.float64),
                                                     mode="batch", eps=eps)
                advantages.update({q.id: a for q, a in zip(of_type, adv.tolist())})
        order = {q.id: i for i, q in enumerate(questions)}
        for q in sorted(chosen, key=lambda q: order[q.id]):
            trajectories.append(Trajectory("questioner", q.prompt_ids, q.sample.token_ids, q.sample.logprobs,
                                           advantages[q.id], q.reward, f"q:{q.id}",
                                           {"task_type": q.task_type, "cluster": q.cluster_id, "status": str(q.status)},
                                           q.sample.routing))
        # responder and verifier: GRPO within each group
        groups = [(f"resp:{q.id}", "responder", q.responder.prompt_ids, q.responder.samples, q.responder.rewards,
                   q.task_type, q.cluster_id) for q in kept]
        by_id = {q.id: q for q in questions}
        groups += [(f"ver:{v.question_id}:{v.answer_index}", "verifier", v.prompt_ids, v.samples, v.rewards,
                    by_id[v.question_id].task_type, by_id[v.question_id].cluster_id) for v in verifiers]
        if groups:
            rewards = torch.tensor([r for *_, rs, _, _ in groups for r in rs], dtype=torch.float64)
            ids = torch.tensor([k for k, (*_, rs, _, _) in enumerate(groups) for _ in rs])
            adv = iter(spell_kernels.group_advantages(rewards, ids, mode="grpo", eps=eps).tolist())
            for name, role, prompt, samples, rs, task_type, cluster_id in groups:
                for s, r in zip(samples, rs):
                    trajectories.append(Trajectory(role, prompt, s.token_ids, s.logprobs, next(adv), r, name,
                                                   {"task_type": task_type, "cluster": cluster_id}, s.routing))
        selection = {"kept": kept, "positives": positives, "negatives": negatives, "candidates": candidates,
                     "verifiers": verifiers}
        return trajectories, selection

    # --- metrics ---------------------------------------------------------------------------

    def _metrics(self, questions, trajectories, selection, stats, rounds) -> dict:
        g = self.config.sampling.group_size
        groups = [q.responder for q in questions if q.responder is not None]
        histogram = [0] * (g + 1)
        for group in groups:
            histogram[round(group.mean_reward * g)] += 1
        scored = [q.reward for q in questions if q.reward is not None]
        answers = [r for group in groups for r in group.rewards]
        judgments = [r for q in questions for v in q.verifiers for r in v.rewards]
        packed, unpacked = packed_token_counts(trajectories)
        metrics = {
            "step": self.steps_done + 1,
            "rounds": rounds,
            "questions": len(questions),
            **{f"questions_{s.value}": sum(q.status == s for q in questions) for s in Status},
            "reward_questioner": _mean(scored),
            "reward_responder": _mean(answers),
            "reward_verifier": _mean(judgments),
            "pass_rate_histogram": histogram,
            "responder_groups": len(groups),
            "kept_groups": len(selection["kept"]),
            "zero_variance_groups": sum(not group.has_variance for group in groups),
            "questioner_positives": len(selection["positives"]),
            "questioner_negatives": len(selection["negatives"]),
            "verifier_groups": sum(len(q.verifiers) for q in questions),
            "verifier_candidates": len(selection["candidates"]),
            "verifier_kept_groups": len(selection["verifiers"]),
            **{f"trajectories_{role}": sum(t.role == role for t in trajectories)
               for role in ("questioner", "responder", "verifier")},
            "tokens_to_train": sum(len(t.response_ids) for t in trajectories),
            "tokens_forward_shared_prefix": packed,
            "tokens_forward_unpacked": unpacked,
            "memory_entries": len(self.memory),
            "prompts_too_long": stats.too_long,
            "nothing_trainable": not trajectories,
            **expert_load_metrics(self.model),  # MoE: the sampler's expert load (prompts and generated tokens)
        }
        for stage in STAGES:
            metrics[f"tokens_generated_{stage}"] = stats.generated.get(stage, 0)
            metrics[f"tokens_prompt_{stage}"] = stats.prompt.get(stage, 0)
            metrics[f"time_{stage}_s"] = stats.seconds.get(stage, 0.0)
            metrics[f"cpu_{stage}_s"] = stats.cpu_seconds.get(stage, 0.0)  # CPU time of this process
        metrics["tokens_generated"] = sum(stats.generated.values())
        return metrics


class _StepStats:
    def __init__(self):
        self.too_long = 0  # prompts that did not fit the context
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.generated: dict[str, int] = {}
        self.prompt: dict[str, int] = {}

    def add(self, stage: str, seconds: float, generated: int, prompt: int, cpu_seconds: float = 0.0) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + cpu_seconds
        self.generated[stage] = self.generated.get(stage, 0) + generated
        self.prompt[stage] = self.prompt.get(stage, 0) + prompt


def packed_token_counts(trajectories: Sequence[Trajectory]) -> tuple[int, int]:
    """Tokens a training forward pass processes (with shared-prefix packing: each distinct
    prompt once plus every response; without: every prompt + response)."""
    prompts = {tuple(t.prompt_ids) for t in trajectories}
    packed = sum(len(p) for p in prompts) + sum(len(t.response_ids) for t in trajectories)
    return packed, sum(t.num_tokens for t in trajectories)


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _check_options(config: RunConfig) -> None:
    opts, sampling = config.loop, config.sampling
    positive = {"questions": opts.questions, "kept_groups": opts.kept_groups, "max_rounds": opts.max_rounds,
                "group_size": sampling.group_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if opts.verifier_group_size is not None and opts.verifier_group_size < 1:
        raise ValueError(f"verifier_group_size must be a positive integer, got {opts.verifier_group_size!r}")
    if not 0 <= opts.agreement_low <= opts.agreement_high <= 1:
        raise ValueError(f"need 0 <= agreement_low <= agreement_high <= 1, got {opts.agreement_low}, "
                         f"{opts.agreement_high}")
    if opts.negatives_ratio < 0 or opts.verifier_share < 0:
        raise ValueError("negatives_ratio and verifier_share must be >= 0")
