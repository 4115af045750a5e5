"""An external judge model for the evaluation (`--judge-model`), as the method scores its benchmarks.

The judge sees the question, the predicted answer and the ground truth (no documents) and
ends its reply with [[YES]] or [[NO]]; as the released `eval/verify.py` reads it, the verdict
is YES when the reply (after any reasoning trace) holds "YES" and no "NO". It decodes
greedily (temperature 0), once per answer, up to 8192 new tokens by default (the released
judge's setting). Only QA and math answers that the rule reward did not already count
correct are judged (a judge can only raise a score: score = max(rule reward, verdict));
multiple choice is scored by its letter alone. An answer with no extractable final sentence
goes to the judge as the text "None", as the released scripts format a missing prediction.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spell_core.roles import DOC_MC, Task, render_prompt, strip_thinking
from spell_core.evaluation.truncation import truncate_middle

JUDGE_PROMPT_BUDGET = 8192  # judge prompts longer than this are cut in the middle (the method's judge input limit)
UNPARSED_ANSWER = "None"  # str(None): what the released scripts hand the judge for a missing answer
JUDGE_MAX_NEW_TOKENS = 8192
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_INSTRUCTIONS = (
    "Your job is to decide whether an answer predicted by a language model agrees with the ground-truth answer "
    "of a question.\n\n"
    "Compare the substance, not the wording: the prediction is correct when the essential facts of the "
    "ground-truth answer are present in it and nothing in it contradicts them. Numbers are equal when they "
    "denote the same quantity (12% and 0.12, 3.2 million and 3,200,000)."
)


def build_judge_prompt(tokenizer, task: Task, prediction: str, budget: int = JUDGE_PROMPT_BUDGET) -> list[int]:
    """Token ids of the judge's prompt for one predicted answer, at most `budget` (middle cut)."""
    if task.task_type == DOC_MC:
        raise ValueError("multiple choice is scored by its letter only; the judge grades QA and math")
    specific = (
        f"\n\nQuestion: {task.question}\n"
        f"Predicted answer: {prediction}\n"
        f"Ground-truth answer: {task.answer}\n\n"
        "Explain your decision in a sentence or two, then end with [[YES]] if the predicted answer agrees with "
        "the ground truth, or [[NO]] if it does not."
    )
    ids = render_prompt(tokenizer, _INSTRUCTIONS, specific).input_ids
    return truncate_middle(ids, budget)[0]


def judged_text(response: str, extracted: str | None) -> str:
    """What the judge grades: the extracted answer, else "None" (as released)."""
    return UNPARSED_ANSWER if extracted is None else extracted


def parse_judge_verdict(text: str) -> bool:
    """The released eval's reading of a judge reply: YES iff "YES" and no "NO" in its final part."""
    final = strip_thinking(text)
    return final is not None and "YES" in final and "NO" not in final


@dataclass
class Judge:
    """A loaded judge model; `name` is what the user passed (for the output)."""
    model: object
    tokenizer: object
    name: str
    max_new_tokens: int = JUDGE_MAX_NEW_TOKENS

    def verdicts(self, pairs: Sequence[tuple[Task, str]], *, generate: Callable, seed: int = 0,
                 kv_budget_tokens: int | None = None, progress=None) -> list[bool | None]:
        """True (YES) or False for each (task, predicted answer)."""
        if not pairs:
            return []
        budget = min(JUDGE_PROMPT_BUDGET, self.model.config.max_position_embeddings - self.max_new_tokens)
        if budget < 64:
            raise ValueError(f"--judge-max-new-tokens {self.max_new_tokens} leaves {budget} tokens of the judge's "
                             f"context ({self.model.config.max_position_embeddings}) for its prompt: lower it")
        prompts = [build_judge_prompt(self.tokenizer, task, text, budget) for task, text in pairs]
        kwargs = {} if kv_budget_tokens is None else {"kv_budget_tokens": kv_budget_tokens}
        outputs = generate(self.model, self.tokenizer, prompts, n=1, max_new_tokens=self.max_new_tokens,
                           temperature=0.0, seed=seed, progress=progress, **kwargs)
        return [parse_judge_verdict(out[0].text) for out in outputs]


def resolve_judge_model(name: str) -> Path:
    """The checkpoint folder of a judge given as a model alias, a local folder or a hub id
    (Org/Name, fetched with huggingface_hub into its cache)."""
    from spell_core.models.assets import AssetError, resolve_model

    try:
        return resolve_model(name)
    except AssetError as err:
        if not _HUB_ID.fullmatch(str(name)) or Path(name).expanduser().exists():
            raise AssetError(f"--judge-model: {err}") from None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                 "*.jinja", "tokenizer*"]))
    except Exception as err:  # offline, unknown repo, gated repo: one message that says what to do
        raise AssetError(f"--judge-model {name!r}: not a model alias or local folder, and fetching it from the "
                         f"Hugging Face hub failed ({type(err).__name__}: {err}); download the checkpoint and pass "
                         "its folder") from None


def load_judge(name: str, device: str, max_new_tokens: int = JUDGE_MAX_NEW_TOKENS) -> Judge:
    from spell_core.models.model import load_pretrained

    model, tokenizer = load_pretrained(resolve_judge_model(name), device=device)
    return Judge(model, tokenizer, str(name), max_new_tokens)
