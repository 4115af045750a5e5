"""Run configuration: `--ctx` parsing, the cluster budget formula, SPEC.md's defaults."""
import pytest

from spell_core.selfplay.config import RunConfig, context_needed, parse_ctx


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("16k", 16 * 1024),
        ("128k", 131072),
        ("131072", 131072),
        ("1m", 1048576),
        ("16K", 16384),
        ("1M", 1048576),
        (" 8k ", 8192),
        ("100_000", 100000),
        (4096, 4096),
    ],
)
def test_parse_ctx(text, tokens):
    assert parse_ctx(text) == tokens


@pytest.mark.parametrize("text", ["", "k", "abc", "16kb", "1.5k", "-5", "16 k", "0x10", "1g", True])
def test_parse_ctx_rejects_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="not understood.*16k, 128k, 131072"):
        parse_ctx(text)


@pytest.mark.parametrize("text", ["0", "0k", 0, -3])
def test_parse_ctx_rejects_non_positive(text):
    with pytest.raises(ValueError, match="must be positive"):
        parse_ctx(text)


def test_ctx_is_the_document_budget_and_prompt_and_response_come_on_top():
    assert context_needed(16384, 1024, 4096) == 21504  # by hand: 16384 + 1024 + 4096
    config = RunConfig()
    config.data.ctx = 131072
    assert config.cluster_budget == 131072
    assert config.context_needed == 131072 + 1024 + 4096


def test_defaults_follow_spec():
    config = RunConfig()
    assert config.data.ctx == 16384  # training input 16K
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k) == (0.7, 0.95, 0)
    assert config.sampling.max_response_tokens == 4096
    assert config.sampling.group_size == 8
    assert config.model.name == "qwen2.5-coder-0.5b-instruct" and config.data.corpus == "shakespeare"
    assert config.to_dict()["cluster_budget"] == 16384 and config.to_dict()["context_needed"] == 21504
    assert (config.loop.questions, config.loop.max_rounds, config.loop.kept_groups) == (480, 10, 128)
    assert config.loop.memory_admission == "released" and config.loop.enable_thinking is None


def test_sections_are_independent_between_instances():
    a, b = RunConfig(), RunConfig()
    a.data.ctx = 1
    assert b.data.ctx == 16384
