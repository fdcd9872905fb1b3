"""The Slurm scripts' own defaults against the env file they point at, run by bash without Slurm
(the whole cluster test is ``test_slurm.py``). A stand-in ``worker`` runs ``config`` where the
script runs ``run``: the effective settings and where each came from."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = ("antenna-worker.sbatch", "antenna-worker-array.sbatch")


def _effective(script: str, tmp_path, env_file_text: str | None, **environ: str) -> dict[str, tuple[str, str]]:
    """Setting -> (value, source line) as ``worker config`` prints them."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    stand_in = venv_bin / "worker"
    stand_in.write_text('#!/bin/bash\nargs=("$@"); for i in "${!args[@]}"; do [[ ${args[$i]} == run ]] && '
                        f'args[$i]=config; done\nexec {sys.executable} -m worker.cli "${{args[@]}}"\n')
    stand_in.chmod(0o755)
    env_file = tmp_path / "worker.env"
    if env_file_text is not None:
        env_file.write_text(env_file_text)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "SLURM_MEM_PER_NODE": "32768",
           "ANTENNA_WORKER_VENV": str(tmp_path / "venv"), "ANTENNA_WORKER_ENV_FILE": str(env_file), **environ}
    done = subprocess.run(["bash", str(ROOT / "deploy" / "slurm" / script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    settings, source = {}, ""
    for line in done.stdout.splitlines():
        if line.startswith("# from "):
            source = line[len("# from "):]
        elif "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            settings[name] = (value.split("  #")[0].strip(), source)
    return settings


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_env_file_wins_over_the_scripts_defaults(tmp_path, script):
    """Before: the scripts exported their defaults, which outrank --env-file: an 8 GiB cap in the
    env file became the whole 32 GiB --mem, silently."""
    text = "AMI_MAX_MEMORY_BYTES=8GiB\nAMI_SHUTDOWN_GRACE_S=30\nexport AMI_METRICS_ADDR=127.0.0.1:9555\n"
    settings = _effective(script, tmp_path, text)
    env_file = str(tmp_path / "worker.env")
    assert settings["AMI_MAX_MEMORY_BYTES"] == (str(8 * 1024**3), env_file)
    assert settings["AMI_SHUTDOWN_GRACE_S"] == ("30.0", env_file)
    assert settings["AMI_METRICS_ADDR"] == ("127.0.0.1:9555", env_file)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_defaults_apply_where_nothing_sets_them_and_the_environment_wins(tmp_path, script):
    settings = _effective(script, tmp_path, None)
    assert settings["AMI_MAX_MEMORY_BYTES"] == (str(32768 * 1024 * 1024), "the environment")
    assert settings["AMI_SHUTDOWN_GRACE_S"] == ("120.0", "the environment")
    assert settings["AMI_METRICS_ADDR"] == ("127.0.0.1:0", "the environment")
    settings = _effective(script, tmp_path, "AMI_SHUTDOWN_GRACE_S=30\n", AMI_SHUTDOWN_GRACE_S="45")
    assert settings["AMI_SHUTDOWN_GRACE_S"] == ("45.0", "the environment")
