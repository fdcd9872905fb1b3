"""The systemd units, checked by systemd's own tools: ``systemd-analyze verify`` (no warning at all)
and ``systemd-analyze security --offline=true`` (exposure <= 4.0), on a scratch root that holds the
host's stock units and a stand-in for the installed ``worker`` script."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
# unit file -> the unit name to check (a template is checked through an instance)
CHECKED = {"antenna-worker.service": "antenna-worker.service", "antenna-worker@.service": "antenna-worker@0.service"}
MAX_EXPOSURE = 4.0
ANALYZE = shutil.which("systemd-analyze")
STOCK_UNIT_DIRS = [Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the host's stock units (verify resolves sysinit.target and friends there), the
    units under test in /etc/systemd/system, and an executable at the units' ExecStart path."""
    stock = next((path for path in STOCK_UNIT_DIRS if (path / "sysinit.target").exists()), None)
    if stock is None:
        pytest.skip(f"no stock systemd units (sysinit.target) in {[str(p) for p in STOCK_UNIT_DIRS]}")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(stock, root / "usr/lib/systemd/system", symlinks=True)
    for unit in CHECKED:
        (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
        shutil.copy2(UNITS / unit, root / "etc/systemd/system" / unit)
    script = root / "opt/antenna-worker/venv/bin/worker"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    return root


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ANALYZE), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("unit", sorted(CHECKED))
def test_the_unit_passes_verify_without_a_warning(scratch_root, unit):
    done = _analyze("verify", "--man=no", f"--root={scratch_root}", CHECKED[unit])
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("unit", sorted(CHECKED))
def test_the_unit_is_hardened_to_an_exposure_of_at_most_4(scratch_root, unit):
    done = _analyze("security", "--offline=true", f"--root={scratch_root}", "--no-pager", CHECKED[unit])
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match, done.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


def _directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("unit", sorted(CHECKED))
def test_the_unit_survives_a_loader_oom_starts_slowly_and_keeps_the_gpu_reachable(unit):
    directives = _directives(unit)
    assert directives["OOMPolicy"] == ["continue"]
    assert int(directives["TimeoutStartSec"][0]) >= 300
    assert directives["WorkingDirectory"][0].startswith("%S/antenna-worker")
    assert directives["Type"] == ["notify"] and directives["KillMode"] == ["mixed"]
    # What would block /dev/nvidia* or torch's JIT stays off.
    assert directives.get("PrivateDevices", ["no"]) == ["no"]
    assert directives.get("DevicePolicy", ["auto"]) == ["auto"]
    assert directives.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert directives.get("PrivateUsers", ["no"]) == ["no"]


def test_the_template_pins_one_gpu_and_gives_each_instance_its_own_port_and_state():
    directives = _directives("antenna-worker@.service")
    environment = dict(value.split("=", 1) for value in directives["Environment"])
    assert environment["CUDA_VISIBLE_DEVICES"] == "%i"
    assert "%i" in environment["AMI_METRICS_ADDR"] and "%i" in environment["AMI_USER_DATA_PATH"]
    assert directives["StateDirectory"] == ["antenna-worker/%i"]
    assert "-/etc/antenna-worker@%i.env" in directives["EnvironmentFile"]
