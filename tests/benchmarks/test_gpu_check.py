"""benchmarks/gpu_check.py: its table, and its one line on a host without CUDA."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import Row, format_table

ROOT = Path(__file__).resolve().parents[2]


def test_table_has_a_header_and_one_row_per_check_with_pipes_escaped():
    text = format_table([
        Row("pinned", "copies overlap", "16 x 2048x1536: 25.1 GB/s | 12.0 GB/s", "pass"),
        Row("oom-split", "every image gets a result", "0 splits\n(no cap fitted)", "FAIL"),
    ])
    lines = text.splitlines()
    assert lines[0] == "| check | claim | measured | verdict |"
    assert lines[1] == "|---|---|---|---|"
    assert len(lines) == 4
    assert lines[2] == "| pinned | copies overlap | 16 x 2048x1536: 25.1 GB/s \\| 12.0 GB/s | pass |"
    assert lines[3] == "| oom-split | every image gets a result | 0 splits (no cap fitted) | **FAIL** |"
    assert all(line.count(" | ") == 3 for line in lines[2:])  # the escaped pipe splits no cell


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path needs a host without CUDA")
@pytest.mark.timeout(60)
def test_without_cuda_it_prints_one_line_and_exits_0():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: no CUDA device (torch ")
    assert done.stdout.count("\n") == 1
