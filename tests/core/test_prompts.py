"""Role prompts rendered through a real chat template (ChatML) and a real byte-level BPE
tokenizer built here, so no model download is needed."""
import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spell_core.selfplay.memory import MemoryEntry
from spell_core.roles import (DOC_MATH, DOC_MC, DOC_QA, TASK_TYPES, Task, build_grounding_prompt,
                              build_questioner_prompt, build_responder_prompt, build_verifier_prompt,
                              token_counter)

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DOCUMENTS = [
    "Macbeth, a general of King Duncan, meets three witches on a heath near Forres.",
    "Lady Macbeth urges her husband to kill Duncan at their castle of Inverness.",
    "Banquo is murdered at dusk; his son Fleance escapes into the night.",
]
MC_TASK = Task(DOC_MC, "Who escapes the murderers?", "C",
               {"A": "Banquo", "B": "Duncan", "C": "Fleance", "D": "Macduff"})
QA_TASK = Task(DOC_QA, "Where does Lady Macbeth urge the murder?", "Inverness")


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = DOCUMENTS + ["The answer is. Question: Below are documents, read them closely. <document> </document>"]
    bpe.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   chat_template=CHATML)


def reference_ids(tokenizer, prompt):
    """The oracle: transformers' own tokenized chat rendering."""
    out = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def assert_consistent(tokenizer, prompt):
    assert prompt.input_ids == reference_ids(tokenizer, prompt)
    assert tokenizer.decode(prompt.input_ids) == prompt.text
    assert prompt.text.startswith("<|im_start|>system\n")
    assert prompt.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.messages[-1]["role"] == "user"


# --- responder ------------------------------------------------------------------------------


def test_responder_prompt_documents_first_question_last(tokenizer):
    prompt = build_responder_prompt(tokenizer, DOCUMENTS, MC_TASK)
    assert_consistent(tokenizer, prompt)
    positions = [prompt.text.index(d) for d in DOCUMENTS] + [prompt.text.index(MC_TASK.question)]
    assert positions == sorted(positions)  # documents in order, then the question
    # LongBench-v2 style choices, and the closing sentence SPEC asks for
    assert f"{MC_TASK.question}\n\nChoices:\n(A) Banquo\n(B) Duncan\n(C) Fleance\n(D) Macduff\n" in prompt.text
    assert 'end your response with the sentence "The correct answer is (X)"' in prompt.text


@pytest.mark.parametrize("task, sentence", [
    (Task(DOC_QA, "Who?", "Macbeth"), '"The correct answer is <answer>"'),
    (Task(DOC_MATH, "How many?", "3"), '"Therefore, the answer is <number>"'),
])
def test_responder_prompt_asks_for_the_answer_sentence(tokenizer, task, sentence):
    for prompt in (build_responder_prompt(tokenizer, DOCUMENTS, task), build_grounding_prompt(tokenizer, task)):
        assert f"end your response with the sentence {sentence}" in prompt.text
        assert "Choices:" not in prompt.text


def test_responder_prompts_share_the_whole_document_prefix(tokenizer):
    a = build_responder_prompt(tokenizer, DOCUMENTS, MC_TASK)
    b = build_responder_prompt(tokenizer, DOCUMENTS, QA_TASK)
    assert a.prefix_len == b.prefix_len > 0
    assert a.input_ids[: a.prefix_len] == b.input_ids[: b.prefix_len]
    shared = tokenizer.decode(a.input_ids[: a.prefix_len])
    assert shared.rstrip().endswith(DOCUMENTS[-1] + "\n</document>")  # every document is in the prefix
    assert MC_TASK.question not in shared
    # the prefix is exact: the prefix text tokenized alone gives the same ids
    assert tokenizer(shared, add_special_tokens=False)["input_ids"] == a.input_ids[: a.prefix_len]
    # other documents, other prefix
    c = build_responder_prompt(tokenizer, DOCUMENTS[:2], QA_TASK)
    assert c.input_ids[: c.prefix_len] != a.input_ids[: a.prefix_len]


def test_prefix_len_stays_exact_when_tokens_merge_across_the_boundary():
    # no pre-tokenizer splitting, trained so that "</document>\n\nQuestion:" merges into few tokens
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(["</document>\n\nQuestion:"] * 50, trainer)
    merging = PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=CHATML)
    a = build_responder_prompt(merging, DOCUMENTS, QA_TASK)
    b = build_responder_prompt(merging, DOCUMENTS, MC_TASK)
    shared_text = a.text[: a.text.index("\n\nQuestion:")]
    shared_ids = merging(shared_text, add_special_tokens=False)["input_ids"]
    assert 0 < a.prefix_len < len(shared_ids)  # the last tokens of the shared text merged away
    assert a.input_ids[: a.prefix_len] == shared_ids[: a.prefix_len]
    assert a.input_ids[a.prefix_len] != shared_ids[a.prefix_len]  # maximal
    assert b.prefix_len == a.prefix_len and b.input_ids[: b.prefix_len] == a.input_ids[: a.prefix_len]


def test_documents_may_be_objects_with_text(tokenizer):
    class Doc:
        def __init__(self, text):
            self.id, self.text = id(text), text

    as_objects = build_responder_prompt(tokenizer, [Doc(t) for t in DOCUMENTS], QA_TASK)
    assert as_objects.input_ids == build_responder_prompt(tokenizer, DOCUMENTS, QA_TASK).input_ids
    with pytest.raises(TypeError, match=r"\.text"):
        build_responder_prompt(tokenizer, [42], QA_TASK)
    with pytest.raises(ValueError, match="grounding"):
        build_responder_prompt(tokenizer, [], QA_TASK)


def test_grounding_prompt_is_the_responder_template_with_empty_documents(tokenizer):
    """Released pre-filter: the responder's template with the documents replaced by "Empty"."""
    prompt = build_grounding_prompt(tokenizer, MC_TASK)
    assert_consistent(tokenizer, prompt)
    assert prompt.text == build_responder_prompt(tokenizer, ["Empty"], MC_TASK).text
    assert MC_TASK.question in prompt.text and "\n(C) Fleance\n" in prompt.text
    assert not any(d in prompt.text for d in DOCUMENTS)
    assert "<document>Empty</document>" in prompt.text.replace("\n", "")


# --- questioner -----------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_questioner_prompt_states_the_json_format(tokenizer, task_type):
    prompt = build_questioner_prompt(tokenizer, DOCUMENTS, task_type)
    assert_consistent(tokenizer, prompt)
    text = prompt.text
    assert all(d in text for d in DOCUMENTS)
    assert text.index(DOCUMENTS[-1]) < text.index("```json")  # documents first
    assert '"question"' in text and '"answer"' in text
    assert ('"options"' in text) == (task_type == DOC_MC)
    assert "Example 1" not in text and "harder" not in text
    assert prompt.prefix_len > 0


def test_questioner_prompts_differ_by_task(tokenizer):
    texts = {t: build_questioner_prompt(tokenizer, DOCUMENTS, t).text for t in TASK_TYPES}
    assert "multi-hop" in texts[DOC_QA]
    assert "one number, not zero" in texts[DOC_MATH]
    assert "A, B, C and D" in texts[DOC_MC] and "different plausible mistake" in texts[DOC_MC]


def test_questioner_prompt_with_history_demands_a_harder_different_question(tokenizer):
    history = [MemoryEntry(("d0",), "Who meets the witches?", "Macbeth"),
               MemoryEntry(("d1",), "Whose castle is at Inverness?", "Macbeth's",
                           {"A": "Duncan's", "B": "Macbeth's", "C": "Banquo's", "D": "Malcolm's"})]
    prompt = build_questioner_prompt(tokenizer, DOCUMENTS, DOC_MC, history)
    assert_consistent(tokenizer, prompt)
    text = prompt.text
    assert "Example 1:\nQuestion: Who meets the witches?\nAnswer: Macbeth" in text
    assert "Example 2:" in text and "(B) Macbeth's" in text
    assert "harder" in text and "different" in text
    assert text.index(DOCUMENTS[-1]) < text.index("Example 1") < text.index("```json")


def test_unknown_task_type_and_no_documents_are_errors(tokenizer):
    with pytest.raises(ValueError, match="doc_qa"):
        build_questioner_prompt(tokenizer, DOCUMENTS, "doc_poetry")
    with pytest.raises(ValueError, match="document"):
        build_questioner_prompt(tokenizer, [], DOC_QA)


# --- verifier -------------------------------------------------------------------------------


def test_verifier_prompt_has_question_answer_reference_and_no_documents(tokenizer):
    prompt = build_verifier_prompt(tokenizer, MC_TASK, "Fleance, the son of Banquo")
    assert_consistent(tokenizer, prompt)
    text = prompt.text
    assert f"{MC_TASK.question}\n\nChoices:\n(A) Banquo\n" in text
    assert "Reference answer: (C) Fleance" in text
    assert "Answer to grade: Fleance, the son of Banquo" in text
    assert "[[YES]]" in text and "[[NO]]" in text
    assert not any(d in text for d in DOCUMENTS)


def test_verifier_prompt_states_the_numeric_tolerance(tokenizer):
    text = build_verifier_prompt(tokenizer, Task(DOC_MATH, "How many witches?", "3"), "three").text
    assert "0.15%" in text and "Reference answer: 3" in text


# --- the default model's own tokenizer and template ------------------------------------------


def test_default_model_tokenizer_shares_every_document():
    from transformers import AutoTokenizer

    from spell_core.models.assets import resolve_model

    smollm = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    a = build_responder_prompt(smollm, DOCUMENTS, QA_TASK)
    b = build_responder_prompt(smollm, DOCUMENTS, MC_TASK)
    assert a.input_ids == reference_ids(smollm, a)
    assert a.text.startswith("<|im_start|>system\n") and a.text.endswith("<|im_start|>assistant\n")
    assert a.prefix_len == b.prefix_len and a.input_ids[: a.prefix_len] == b.input_ids[: b.prefix_len]
    assert smollm.decode(a.input_ids[: a.prefix_len]).endswith(DOCUMENTS[-1] + "\n</document>")


# --- tokenizer plumbing ---------------------------------------------------------------------


def test_token_counter_counts_tokens_of_the_text_alone(tokenizer):
    count = token_counter(tokenizer)
    assert count("Macbeth") == len(tokenizer.encode("Macbeth", add_special_tokens=False))
    assert count("") == 0


def test_template_kwargs_reach_the_template(tokenizer):
    templated = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, chat_template=(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!{% endif %}"))
    assert build_grounding_prompt(templated, QA_TASK, template_kwargs={"shout": True}).text.endswith("!")
    assert not build_grounding_prompt(templated, QA_TASK).text.endswith("!")


def test_missing_chat_template_is_a_clear_error(tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        build_responder_prompt(bare, DOCUMENTS, QA_TASK)


def test_thinking_kwargs_only_for_templates_that_read_them(tokenizer):
    from spell_core.roles import thinking_template_kwargs

    assert thinking_template_kwargs(tokenizer, True) == {}  # ChatML without the variable: nothing passed
    qwen3_like = copy.copy(tokenizer)
    qwen3_like.chat_template = CHATML + "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    assert thinking_template_kwargs(qwen3_like, False) == {"enable_thinking": False}
    assert thinking_template_kwargs(qwen3_like, True) == {"enable_thinking": True}
    assert thinking_template_kwargs(qwen3_like, None) == {}  # the template's own default
    prompt = build_grounding_prompt(qwen3_like, QA_TASK, template_kwargs=thinking_template_kwargs(qwen3_like, False))
    assert prompt.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
