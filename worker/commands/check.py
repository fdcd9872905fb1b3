"""Operator commands: ``worker config`` (effective settings and their sources) and ``worker check``.

``worker config`` prints every setting as an env file that systemd's ``EnvironmentFile=`` and
``--env-file`` both read: grouped under a comment naming where it came from (the process
environment, which wins, the file given by ``--env-file``, or the defaults). Defaults are printed
commented out, so the output read back pins nothing; a value line carries no trailing comment. The
token is never printed, nor a URL holding a password: their lines are commented out.

``worker check`` runs the checks an operator wants before ``systemctl start``: API reachable and
the token accepted, the token allowed to reserve tasks, the device, each offered pipeline loads,
the spool (writable; results waiting, unreadable files moved aside, jobs whose every result the
server rejects), the metrics port free, the open-files limit, the memory limit the watchdog will
use, /dev/shm room for loader workers. One line each; exit 0 when all pass, 1 otherwise.
"""
from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, TextIO

from dotenv import dotenv_values
from pydantic import SecretStr

from worker.settings import EMPTY_IS_A_CHOICE, ENV_PREFIX, Settings, redact_url

if TYPE_CHECKING:
    import torch

    from worker.antenna import AntennaClient

MIB = 1024**2
MIN_HARD_FD_LIMIT = 4096
MIN_SOFT_CAP_BYTES = 1024 * MIB
# A 4096x3072 RGB image decoded to uint8: the large camera-trap frames of the failure stories.
LARGE_DECODED_IMAGE_BYTES = 4096 * 3072 * 3
MIN_SHM_BYTES = 256 * MIB
SHM_PATH = "/dev/shm"
CHECK_TIMEOUT_S = 10.0


# Printed bare; anything else is quoted (systemd and python-dotenv strip quotes the same way).
_BARE_VALUE = re.compile(r"[A-Za-z0-9_./:@,+=~%*-]*")
TOKEN_PLACEHOLDER = "<your token>"
SECRET_SET = "<set, not shown>"
Source = str  # "env", an env file's path, or "default"


def env_file_value(text: str) -> str:
    """``text`` as the right-hand side of an env-file line."""
    if _BARE_VALUE.fullmatch(text):
        return text
    if "'" not in text and "\\" not in text:
        return f"'{text}'"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_line(variable: str, value: object, source: Source) -> str:
    """One ``AMI_NAME=value`` line; commented out for a default, a secret or a redacted URL."""
    if isinstance(value, SecretStr) or variable == ENV_PREFIX + "ANTENNA_API_AUTH_TOKEN":
        return f"# {variable}={SECRET_SET if value else TOKEN_PLACEHOLDER}"
    if value is None:
        return f"# {variable}="
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    shown = redact_url(text) if "://" in text else text
    commented = source == "default" or shown != text
    return ("# " if commented else "") + f"{variable}={env_file_value(shown)}"


def setting_sources(settings: Settings, environ: Mapping[str, str], env_file: Optional[str]) -> dict[str, Source]:
    """``AMI_NAME`` -> ``env`` | the env file's path | ``default``, by pydantic-settings' precedence
    (an empty value counts as unset, as in ``Settings``)."""
    choices = {ENV_PREFIX + name.upper() for name in EMPTY_IS_A_CHOICE}
    in_env = {key.upper() for key, value in environ.items() if value or key.upper() in choices}
    in_file: set[str] = set()
    if env_file and Path(env_file).is_file():
        in_file = {key.upper() for key, value in dotenv_values(env_file).items()
                   if value or key.upper() in choices}
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
    print("# antenna-worker settings in effect (`worker config`): an env file for --env-file or systemd's\n"
          "# EnvironmentFile=. Defaults are commented out so that reading this back pins nothing; so are\n"
          "# secrets (the token, a URL with a password), never printed: add those yourself.", file=out)
    for source in ["env", *sorted({s for s in sources.values() if s not in ("env", "default")}), "default"]:
        variables = [variable for variable, where in sources.items() if where == source]
        if not variables:
            continue
        heading = {"env": "from the environment", "default": "defaults (uncomment a line to pin it)"}
        print(f"\n# {heading.get(source, f'from {source}')}", file=out)
        for variable in variables:
            print(config_line(variable, getattr(settings, variable[len(ENV_PREFIX):].lower()), source), file=out)
    return 0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_api(settings: Settings) -> Check:
    from worker.antenna import AntennaError, AntennaRejected, AntennaUnavailable
    from worker.app import offered_slugs

    if not settings.token:
        return Check("api", False, "AMI_ANTENNA_API_AUTH_TOKEN is not set")
    client = _check_client(settings)
    url = redact_url(settings.antenna_api_base_url)
    try:
        projects = client.list_projects()
        client.list_jobs(offered_slugs(settings), limit=1)
    except AntennaRejected as error:
        if error.status in (401, 403):
            return Check("api", False, f"{url} rejected the token (HTTP {error.status}): "
                                       "check AMI_ANTENNA_API_AUTH_TOKEN")
        return Check("api", False, f"{url} answered HTTP {error.status}: check AMI_ANTENNA_API_BASE_URL")
    except AntennaError as error:
        if isinstance(error, AntennaUnavailable) and error.reason == "bad_response":
            return Check("api", False, f"{url} answered, but not as Antenna's API does ({_first_line(error)}): "
                                       "check AMI_ANTENNA_API_BASE_URL (a proxy's or a login page?)")
        return Check("api", False, f"{url} unreachable: {_first_line(error)}")
    finally:
        client.close()
    return Check("api", True, f"{url} reachable, token accepted, {len(projects)} projects visible")


def _check_client(settings: Settings) -> "AntennaClient":
    from worker.antenna import AntennaClient

    return AntennaClient(settings.antenna_api_base_url, settings.token,
                         timeout_s=min(settings.antenna_api_timeout_s, CHECK_TIMEOUT_S), max_attempts=1)


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


def check_reserve(settings: Settings) -> Check:
    """Whether the token may reserve tasks, without reserving any: an empty result post to a waiting
    job. The task and result endpoints check the same job permission, and the empty post's body is
    valid, so a server reaches that check whatever order it validates in: 403 without it, 200 with
    nothing queued with it. A reserve of batch_size 0 cannot tell: Antenna validates a reserve's
    body before the permission, so it answers 400 to any token."""
    from worker.antenna import AntennaError, AntennaRejected
    from worker.app import offered_slugs

    if not settings.token:
        return Check("reserve", False, "not checked: AMI_ANTENNA_API_AUTH_TOKEN is not set")
    client = _check_client(settings)
    try:
        jobs = client.list_jobs(offered_slugs(settings), limit=1)
        if not jobs:
            return Check("reserve", True, "not checked: no job of the offered pipelines is waiting")
        client.post_results(jobs[0].id, [])
    except AntennaRejected as error:
        if error.status == 403:
            return Check("reserve", False, f"HTTP 403 posting to job {jobs[0].id}: the server grants tasks "
                                           "and results to superusers only; use a superuser's token")
        return Check("reserve", False, f"not checked: {_first_line(error)}")
    except AntennaError as error:
        return Check("reserve", False, f"not checked: {_first_line(error)}")
    finally:
        client.close()
    return Check("reserve", True, f"the token may reserve tasks (job {jobs[0].id}, probed with an empty "
                                  "result post: nothing reserved or posted)")


def check_device(settings: Settings) -> tuple[Check, Optional["torch.device"]]:
    import torch

    from worker.pipelines import select_device
    from worker.settings import SettingsError

    try:
        device = select_device(settings.device)
    except SettingsError as error:
        return Check("device", False, str(error)), None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no CUDA device in use"
    return Check("device", True, f"{device.type} (AMI_DEVICE={settings.device}; {name})"), device


def check_pipelines(settings: Settings, device: Optional["torch.device"]) -> list[Check]:
    """Each offered pipeline loads on the device (what the start does before any job)."""
    import time

    from worker.app import offered_slugs, pipeline_loader

    checks = []
    for slug in offered_slugs(settings):
        if device is None:
            checks.append(Check(f"pipeline {slug}", False, "not checked: no device"))
            continue
        started_s = time.perf_counter()
        try:
            pipeline_loader(settings, device)(slug).prepare()  # ADC's: files fetched and whole
        except (OSError, RuntimeError, ValueError) as error:
            checks.append(Check(f"pipeline {slug}", False, f"{_first_line(error)}; check AMI_ANTENNA_PIPELINES"))
            continue
        checks.append(Check(f"pipeline {slug}", True, f"loaded on {device.type} in "
                                                      f"{time.perf_counter() - started_s:.1f} s"))
    return checks


def check_metrics_port(settings: Settings) -> Check:
    import socket

    from worker.middleware.prometheus import parse_addr

    if not settings.metrics_addr:
        return Check("metrics", True, "disabled (AMI_METRICS_ADDR is empty)")
    host, port = parse_addr(settings.metrics_addr)
    if port == 0:
        return Check("metrics", True, f"any free port on {host} (the worker logs the one it gets)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
        try:
            probe.bind((host, port))
        except OSError as error:
            return Check("metrics", False, f"{host}:{port} is in use ({error.strerror}): another worker? give each "
                                           "instance its own AMI_METRICS_ADDR (HOST:0 picks a free port)")
    return Check("metrics", True, f"{host}:{port} is free")


def check_spool(settings: Settings) -> Check:
    """The spool must be writable (created as the start would); fails on unreadable files (moved to
    ``corrupt/``) and on jobs whose every result the server rejected (their results are held until
    the cause is fixed)."""
    from worker.posting import Spool, SpoolCorrupt

    directory = settings.user_data_path / "spool"
    spool = Spool(directory)
    error = spool.unwritable()
    if error is not None:
        return Check("spool", False, f"{directory} is not writable ({error.strerror}): fix its owner or set "
                                     "AMI_USER_DATA_PATH")
    files, items = spool.files(), 0
    for path in files:
        try:
            items += len(Spool.read(path)[1])
        except (SpoolCorrupt, OSError):
            pass  # the next replay moves it aside
    corrupt_dir = spool.directory / "corrupt"
    corrupt = len(list(corrupt_dir.iterdir())) if corrupt_dir.is_dir() else 0
    rejections = spool.rejections()
    parts = [f"{directory} writable; {items} results in {len(files)} files waiting"]
    if corrupt:
        parts.append(f"{corrupt} unreadable files moved to {corrupt_dir}: inspect and delete them")
    parts.extend(f"job {job_id}: the server rejects every result ({cause}); they are held until the "
                 "cause is fixed (register the pipeline's algorithms, upgrade the worker), then replayed "
                 "at the next start" for job_id, cause in rejections.items())
    return Check("spool", not corrupt and not rejections, "; ".join(parts))


def run_checks(settings: Settings) -> list[Check]:
    device_check, device = check_device(settings)
    checks: list[Callable[[], Check]] = [
        lambda: check_api(settings), lambda: check_reserve(settings), lambda: device_check,
    ]
    late: list[Callable[[], Check]] = [
        lambda: check_spool(settings), lambda: check_metrics_port(settings), check_fd_limit,
        lambda: check_memory(settings), lambda: check_shm(settings),
    ]
    return [check() for check in checks] + check_pipelines(settings, device) + [check() for check in late]


def print_checks(settings: Settings, out: Optional[TextIO] = None) -> int:
    import sys

    out = out or sys.stdout
    results = run_checks(settings)
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'}  {result.name}: {result.detail}", file=out)
    return 0 if all(result.ok for result in results) else 1


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__
