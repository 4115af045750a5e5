"""spell_core.common.host_memory: freed tensors leave the resident set (checked against glibc's default)."""
import json
import subprocess
import sys

import pytest

PROGRAM = r"""
import json, sys
import torch
from spell_core.common.host_memory import return_freed_memory, trim_freed_memory

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

applied = return_freed_memory() if sys.argv[1] == "set" else None
torch.set_num_threads(1)
warm = torch.ones(4 << 18)  # one 4 MiB block freed: glibc's own threshold then grows past 4 MiB
del warm
big, small = [], []
for i in range(100):  # 400 MiB of 4 MiB blocks, each followed by a small block that stays
    big.append(torch.ones(4 << 18))
    small.append(torch.ones(64))
before = rss()
big.clear()
if sys.argv[1] == "trim":
    applied = trim_freed_memory()
print(json.dumps({"applied": applied, "returned": (before - rss()) / (400 << 20)}))
"""


def returned(mode):
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_go_back_to_the_system_and_do_not_by_default():
    default, fixed = returned("default"), returned("set")
    assert default["returned"] < 0.5  # glibc keeps the holes between the small blocks resident
    assert fixed["applied"] is True and fixed["returned"] > 0.9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_a_trim_returns_the_freed_blocks_that_the_default_keeps():
    trimmed = returned("trim")
    assert trimmed["applied"] is True and trimmed["returned"] > 0.9
