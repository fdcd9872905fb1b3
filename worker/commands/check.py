"""Operator commands: ``worker config`` (effective settings and their sources) and ``worker check``.

``worker config`` prints every setting as ``AMI_NAME=value`` (so the output pastes into an env
file) with where it came from: ``env`` (the process environment, which wins), the ``.env`` file
given by ``--env-file``, or ``default``. The token is never printed, nor passwords inside URLs.

``worker check`` runs the checks an operator wants before ``systemctl start``: API reachable and
the token accepted, the open-files limit, the memory limit the watchdog will use, /dev/shm room
for loader workers, and the result spool (results waiting, unreadable files moved aside, jobs
whose every result the server rejects). One line each; exit 0 when all pass, 1 otherwise.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, TextIO
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import SecretStr

from worker.settings import ENV_PREFIX, Settings

REDACTED = "***"
MIB = 1024**2
MIN_HARD_FD_LIMIT = 4096
MIN_SOFT_CAP_BYTES = 1024 * MIB
# A 4096x3072 RGB image decoded to uint8: the large camera-trap frames of the failure stories.
LARGE_DECODED_IMAGE_BYTES = 4096 * 3072 * 3
MIN_SHM_BYTES = 256 * MIB
SHM_PATH = "/dev/shm"
CHECK_TIMEOUT_S = 10.0


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:{REDACTED}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def shown_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return REDACTED if value.get_secret_value() else ""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return redact_url(text) if "://" in text else text


def setting_sources(settings: Settings, environ: Mapping[str, str], env_file: Optional[str]) -> dict[str, str]:
    """``AMI_NAME`` -> ``env`` | the env file's path | ``default``, by pydantic-settings' precedence."""
    in_env = {key.upper() for key in environ}
    in_file: set[str] = set()
    if env_file and Path(env_file).is_file():
        in_file = {key.upper() for key in dotenv_values(env_file)}
    sources = {}
    for name in Settings.model_fields:
        variable = ENV_PREFIX + name.upper()
        sources[variable] = "env" if variable in in_env else env_file if variable in in_file else "default"
    return sources


def print_config(settings: Settings, *, env_file: Optional[str], environ: Optional[Mapping[str, str]] = None,
                 out: Optional[TextIO] = None) -> int:
    import sys

    out = out or sys.stdout
    sources = setting_sources(settings, os.environ if environ is None else environ, env_file)
    lines = [(variable, shown_value(getattr(settings, variable[len(ENV_PREFIX):].lower())), source)
             for variable, source in sources.items()]
    width = max(len(f"{v}={s}") for v, s, _ in lines)
    for variable, shown, source in lines:
        print(f"{variable}={shown}".ljust(width) + f"  # {source}", file=out)
    return 0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_api(settings: Settings) -> Check:
    from worker.antenna import AntennaClient, AntennaError, AntennaRejected

    if not settings.token:
        return Check("api", False, "AMI_ANTENNA_API_AUTH_TOKEN is not set")
    client = AntennaClient(settings.antenna_api_base_url, settings.token,
                           timeout_s=min(settings.antenna_api_timeout_s, CHECK_TIMEOUT_S), max_attempts=1)
    url = redact_url(settings.antenna_api_base_url)
    try:
        projects = client.list_projects()
        client.list_jobs(settings.pipeline_slugs or ["synthetic-moths"], limit=1)
    except AntennaRejected as error:
        if error.status in (401, 403):
            return Check("api", False, f"{url} rejected the token (HTTP {error.status}): "
                                       "check AMI_ANTENNA_API_AUTH_TOKEN")
        return Check("api", False, f"{url} answered HTTP {error.status}: check AMI_ANTENNA_API_BASE_URL")
    except AntennaError as error:
        return Check("api", False, f"{url} unreachable: {_first_line(error)}")
    finally:
        client.close()
    return Check("api", True, f"{url} reachable, token accepted, {len(projects)} projects visible")


def check_fd_limit() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    shown_hard = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    ok = hard == resource.RLIM_INFINITY or hard >= MIN_HARD_FD_LIMIT
    fix = "" if ok else (f"; raise it to 65536 (systemd LimitNOFILE=, supervisord minfds=, ulimit -Hn), "
                         f"below {MIN_HARD_FD_LIMIT} loader workers run out of descriptors")
    return Check("open files", ok, f"soft {soft}, hard {shown_hard} (the worker raises soft to hard at start){fix}")


def check_memory(settings: Settings) -> Check:
    from worker.planning import read_worker_limits

    limits = read_worker_limits(settings)
    ok = limits.soft_cap_bytes >= MIN_SOFT_CAP_BYTES
    fix = "" if ok else (f"; the soft cap is below {MIN_SOFT_CAP_BYTES // MIB} MiB, too little for the model "
                         "and one loader worker: raise the memory limit or AMI_MAX_MEMORY_BYTES")
    return Check("memory", ok, limits.describe() + fix)


def check_shm(settings: Settings, path: str = SHM_PATH) -> Check:
    workers = settings.dataloader_num_workers
    try:
        stat = os.statvfs(path)
    except OSError as error:
        return Check("/dev/shm", workers == 0, f"{path} unreadable ({error}); needed only with loader workers")
    total_bytes, free_bytes = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    # Loader workers hand decoded images to the main process through /dev/shm: room for two large
    # images per worker at least (docker's 64 MiB default fails this).
    needed_bytes = 0 if workers == 0 else max(MIN_SHM_BYTES, workers * 2 * LARGE_DECODED_IMAGE_BYTES)
    ok = free_bytes >= needed_bytes
    detail = (f"{free_bytes / MIB:.0f} MiB free of {total_bytes / MIB:.0f} MiB; {workers} loader workers need "
              f"{needed_bytes / MIB:.0f} MiB")
    if not ok:
        detail += "; enlarge it (docker run --shm-size=2g) or set AMI_ANTENNA_API_DATALOADER_NUM_WORKERS=0"
    return Check("/dev/shm", ok, detail)


def check_spool(settings: Settings) -> Check:
    """Results waiting in the spool; fails on unreadable files (moved to ``corrupt/``) and on jobs
    whose every result the server rejected (their results are held until the cause is fixed)."""
    from worker.posting import Spool, SpoolCorrupt

    spool = Spool(settings.user_data_path / "spool")
    files, items = spool.files(), 0
    for path in files:
        try:
            items += len(Spool.read(path)[1])
        except (SpoolCorrupt, OSError):
            pass  # the next replay moves it aside
    corrupt_dir = spool.directory / "corrupt"
    corrupt = len(list(corrupt_dir.iterdir())) if corrupt_dir.is_dir() else 0
    rejections = spool.rejections()
    parts = [f"{items} results in {len(files)} files waiting in {spool.directory}"]
    if corrupt:
        parts.append(f"{corrupt} unreadable files moved to {corrupt_dir}: inspect and delete them")
    parts.extend(f"job {job_id}: the server rejects every result ({cause}); they are held until the "
                 "cause is fixed (register the pipeline's algorithms, upgrade the worker), then replayed "
                 "at the next start" for job_id, cause in rejections.items())
    return Check("spool", not corrupt and not rejections, "; ".join(parts))


def run_checks(settings: Settings) -> list[Check]:
    checks: list[Callable[[], Check]] = [
        lambda: check_api(settings), check_fd_limit, lambda: check_memory(settings), lambda: check_shm(settings),
        lambda: check_spool(settings),
    ]
    return [check() for check in checks]


def print_checks(settings: Settings, out: Optional[TextIO] = None) -> int:
    import sys

    out = out or sys.stdout
    results = run_checks(settings)
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'}  {result.name}: {result.detail}", file=out)
    return 0 if all(result.ok for result in results) else 1


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__
