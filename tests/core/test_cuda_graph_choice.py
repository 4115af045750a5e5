"""The self-play loop decodes with the CUDA graph on CUDA unless told not to
(spell_core.sampling.decode_graph.choose_cuda_graph); a model that cannot says why, once."""
import types

import pytest
import torch

from spell_core.sampling import decode_graph
from spell_core.sampling.decode_graph import choose_cuda_graph


def fake_model(device: str, rope_type: str = "default"):
    return types.SimpleNamespace(lm_head_weight=types.SimpleNamespace(device=torch.device(device)),
                                 config=types.SimpleNamespace(rope={"rope_type": rope_type}))


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setattr(decode_graph, "kernel_mode", lambda: "triton")


def test_on_by_default_on_cuda(triton_mode):
    assert choose_cuda_graph(fake_model("cuda"), None) is True
    assert choose_cuda_graph(fake_model("cuda"), True) is True


def test_off_when_asked_or_on_a_cpu(triton_mode):
    assert choose_cuda_graph(fake_model("cuda"), False) is False
    assert choose_cuda_graph(fake_model("cpu"), None) is False


def test_default_falls_back_to_eager_and_says_why(triton_mode):
    said = []
    assert choose_cuda_graph(fake_model("cuda", "dynamic"), None, warn=said.append) is False
    assert len(said) == 1 and "dynamic RoPE" in said[0] and "--no-cuda-graph" in said[0]


def test_asked_for_but_unsupported_is_an_error(triton_mode):
    with pytest.raises(ValueError, match="--cuda-graph: .*dynamic RoPE"):
        choose_cuda_graph(fake_model("cuda", "dynamic"), True)
    with pytest.raises(ValueError, match="--cuda-graph: .*CUDA device"):
        choose_cuda_graph(fake_model("cpu"), True)


def test_command_line_flag_reaches_the_loop_options():
    from spell_core import run

    parser = run.build_parser()
    assert parser.parse_args(["--no-cuda-graph"]).cuda_graph is False
    assert parser.parse_args([]).cuda_graph is None
