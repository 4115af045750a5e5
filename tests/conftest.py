"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit module is imported,
so it is set here, first; the Triton path is then chosen per test with SPELL_KERNELS=triton
(see the `triton_path` fixture). Ahead-of-time compilation tests run in a subprocess
without TRITON_INTERPRET."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    torch.set_num_threads(1)  # two workers on two cores: no oversubscription


@pytest.fixture
def triton_path(monkeypatch):
    """Run spell_kernels ops through their Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("SPELL_KERNELS", "triton")
    yield


@pytest.fixture
def torch_path(monkeypatch):
    """Run spell_kernels ops through their PyTorch path."""
    monkeypatch.setenv("SPELL_KERNELS", "torch")
    yield
