"""``worker register`` as a real subprocess against the local server (strict, as Antenna)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import worker_env


def run_register(server, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "register"],
                          env=worker_env(server, tmp_path), capture_output=True, text=True, timeout=100,
                          cwd=tmp_path)


@pytest.mark.timeout(120)
def test_register_reaches_every_project_past_the_first_page_and_twice_changes_nothing(antenna_factory, tmp_path):
    server = antenna_factory(project_ids=range(1, 13), require_registration=True)
    done = run_register(server, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        f"registered 2 pipelines with project {p}" for p in range(1, 13)]
    snapshot = server.registry.snapshot()
    assert {slug: p["projects"] for slug, p in snapshot["pipelines"].items()} == {
        "synthetic-moths": list(range(1, 13)), "null": list(range(1, 13))}
    again = run_register(server, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert server.registry.snapshot() == snapshot
