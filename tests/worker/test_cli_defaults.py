"""Process-wide defaults the ``worker`` command sets before torch loads."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import os, sys
import worker.cli as cli
before = 'torch' in sys.modules
cli.main(["config"])  # any command: the defaults come first
import torch
print("RESULT", before, os.environ["OMP_WAIT_POLICY"], os.environ["THP_MEM_ALLOC_ENABLE"], torch.get_num_threads() >= 1)
"""


def run_probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    clean.update(env)
    done = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split()[1:]


def test_openmp_sleeps_and_torch_uses_huge_pages_unless_the_operator_says_otherwise():
    assert run_probe() == ["False", "PASSIVE", "1", "True"]  # torch not loaded before they were set
    assert run_probe(OMP_WAIT_POLICY="ACTIVE", THP_MEM_ALLOC_ENABLE="0") == ["False", "ACTIVE", "0", "True"]
