"""Shared fixtures: a real local Antenna server on loopback, generated datasets, settings.

Factories clean up after themselves. Generated images are cached across runs under
``$ANTENNA_TEST_CACHE`` (default ``.cache/test-data`` in the checkout).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from worker.testing.antenna_server import LocalAntenna
from worker.settings import Settings, load_settings
from worker.testing.synthetic import SyntheticImage, generate_preset

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-5f1c9e-never-log-me"


def data_cache() -> Path:
    return Path(os.environ.get("ANTENNA_TEST_CACHE", ROOT / ".cache" / "test-data"))


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A ``worker`` command run in process (``worker.cli.main``) points the root logger at that
    test's captured stderr, closed once the test ends: every later test's log line would print
    "--- Logging error ---" instead. Its handler goes (pytest's own handlers are subclasses of
    StreamHandler, and stay), and the root level comes back."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_images() -> list[SyntheticImage]:
    return generate_preset(data_cache(), "tiny", 40, seed=3)


@pytest.fixture(scope="session")
def large_images() -> list[SyntheticImage]:
    return generate_preset(data_cache(), "large", 4, seed=5)


@pytest.fixture
def antenna_factory() -> Iterator[Callable[..., LocalAntenna]]:
    servers: list[LocalAntenna] = []

    def make(**kwargs) -> LocalAntenna:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("rng_seed", 0)
        server = LocalAntenna(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def antenna(antenna_factory) -> LocalAntenna:
    return antenna_factory()


@pytest.fixture
def loopback_netrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A netrc file with credentials for 127.0.0.1, where requests looks for one (``NETRC``), and
    loopback kept off any proxy the environment sets."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return netrc


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """Settings pointing at a server, with a private user-data dir; overrides by field name."""

    def make(server: LocalAntenna, **overrides) -> Settings:
        values = dict(
            antenna_api_base_url=server.base_url, antenna_api_auth_token=TOKEN,
            user_data_path=tmp_path / "user-data", antenna_idle_sleep_seconds=0.05,
            antenna_api_max_attempts=4, metrics_addr="", autotune=False, watchdog_enabled=False,
            antenna_pipelines="synthetic-moths,null",
        )
        values.update(overrides)
        return load_settings(env_file=None, **values)

    return make


def worker_env(server: LocalAntenna, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``worker`` subprocess against ``server``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update({
        "AMI_ANTENNA_API_BASE_URL": server.base_url, "AMI_ANTENNA_API_AUTH_TOKEN": TOKEN,
        "AMI_USER_DATA_PATH": str(tmp_path / "user-data"), "AMI_ANTENNA_IDLE_SLEEP_SECONDS": "0.1",
        "AMI_METRICS_ADDR": "", "AMI_ANTENNA_PIPELINES": "synthetic-moths,null", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env
