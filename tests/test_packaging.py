"""The wheel: what a non-editable install gets (every data file, a licence, the declared imports)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker/", "autotune/", "watchdog/")
DATA_SUFFIXES = (".json", ".yaml", ".yml", ".txt")


def _source_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: what a fresh clone of this tree holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from a copy of the source files: an in-tree ``build/`` left by an earlier
    build would otherwise leak files the configuration does not ship."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("antenna_worker-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


@pytest.mark.timeout(200)
def test_the_wheel_carries_every_data_file_under_the_packages(wheel: zipfile.ZipFile):
    data_files = {name for name in _source_files() if name.startswith(PACKAGES) and name.endswith(DATA_SUFFIXES)}
    assert "autotune/calibration.json" in data_files
    assert data_files - set(wheel.namelist()) == set()


@pytest.mark.timeout(200)
def test_the_wheel_carries_the_mit_licence(wheel: zipfile.ZipFile):
    licences = [name for name in wheel.namelist() if re.search(r"\.dist-info/(licenses/)?LICEN[CS]E", name)]
    assert licences, wheel.namelist()
    text = wheel.read(licences[0]).decode()
    assert "MIT License" in text and "antenna-worker contributors" in text


def _imported_top_level(root: Path) -> set[str]:
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if "testing" in path.parts:
            continue
        for match in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.MULTILINE):
            names.add(match.group(1))
    return names


def test_every_third_party_import_of_production_code_is_declared():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    declared = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]).lower()
    distribution = {"dotenv": "python-dotenv", "PIL": "pillow", "prometheus_client": "prometheus-client",
                    "pydantic_settings": "pydantic-settings", "nats": "nats-py"}
    third_party = {name for root in PACKAGES for name in _imported_top_level(ROOT / root)}
    third_party -= set(sys.stdlib_module_names) | {root.rstrip("/") for root in PACKAGES} | {"__future__"}
    missing = sorted(name for name in third_party if distribution.get(name, name).lower() not in declared)
    assert missing == []
