"""The three SPELL roles as pure logic: prompts, output parsing and rewards.
No model or sampler here: the loop renders prompts with these builders, generates, and
hands the texts back to the parsers and reward functions."""
from .answers import boxed_contents, extract_answer
from .chat import Prompt, render_documents, render_prompt, thinking_template_kwargs, token_counter
from .questioner import SPAN_TOKEN_LIMIT, build_questioner_prompt, parse_questioner_output
from .responder import answered_without_documents, build_grounding_prompt, build_responder_prompt, render_question
from .rewards import (BAD_FORMAT_REWARD, BAD_GROUND_REWARD, QUESTIONER_SCHEMES, REL_TOL, SCALE_FACTORS, SIGMA,
                      choice_match, cover_exact_match, numbers_match, numeric_match, questioner_reward,
                      responder_reward, rule_reward, verifier_majority, verifier_rewards)
from .tasks import DOC_MATH, DOC_MC, DOC_QA, TASK_TYPES, ParsedQuestion, Status, Task, shuffle_options
from .text import normalize_answer, parse_choice, parse_number, strip_thinking
from .verifier import build_verifier_prompt, parse_verdict

__all__ = [
    "BAD_FORMAT_REWARD", "BAD_GROUND_REWARD", "DOC_MATH", "DOC_MC", "DOC_QA", "ParsedQuestion", "Prompt",
    "QUESTIONER_SCHEMES", "REL_TOL", "SCALE_FACTORS", "SIGMA", "SPAN_TOKEN_LIMIT", "Status", "TASK_TYPES",
    "Task", "answered_without_documents", "boxed_contents", "build_grounding_prompt",
    "build_questioner_prompt", "build_responder_prompt", "build_verifier_prompt", "choice_match",
    "cover_exact_match", "extract_answer", "normalize_answer", "numbers_match", "numeric_match",
    "parse_choice", "parse_number", "parse_questioner_output", "parse_verdict", "questioner_reward",
    "render_documents", "render_prompt", "render_question", "responder_reward", "rule_reward", "shuffle_options",
    "strip_thinking", "thinking_template_kwargs", "token_counter", "verifier_majority", "verifier_rewards",
]
