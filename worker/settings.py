"""All settings, read once from the environment (prefix ``AMI_``) and a ``.env`` file.

Names and defaults of the ADC worker's variables are kept so this is a drop-in replacement.
Library code receives a ``Settings`` object; nothing below the CLI reads ``os.environ``.

An empty value counts as unset (``AMI_NUM_WORKERS=`` keeps the default and pins nothing), except
where empty is a choice of its own (``AMI_METRICS_ADDR=`` disables metrics). Every
``*_BYTES`` setting takes a size with a unit (``4GiB``, ``512MiB``, ``1.5G``); paths expand ``~``.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Iterable, Literal, Mapping, Optional
from urllib.parse import urlparse, urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AMI_"


def default_user_data_path() -> Path:
    """The platform app dir ADC uses on Linux (XDG data home)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "AMI"


REDACTED = "***"


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:{REDACTED}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# Size suffixes, case-insensitive. K, M, G, T are powers of 1024 as in systemd's MemoryMax=, like
# KiB..TiB; KB..TB are powers of 1000.
SIZE_UNIT_BYTES = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size_bytes(text: str) -> int:
    """``"4GiB"`` -> 4294967296; a bare number is bytes. Raises ValueError naming the accepted forms."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in SIZE_UNIT_BYTES:
        raise ValueError("must be bytes or a size such as 4GiB, 512MiB or 1.5G "
                         "(K/M/G/T and KiB/MiB/GiB/TiB count in 1024s, KB/MB/GB/TB in 1000s)")
    number = match.group(1)
    return int(number) * SIZE_UNIT_BYTES[unit] if number.isdigit() else int(float(number) * SIZE_UNIT_BYTES[unit])


# ADC's settings (trapdata/settings.py) that this worker does not use, and why: an ADC .env works
# here, and each of these gets one warning instead of silently doing nothing.
_MODELS_ARE_PIPELINES = "models are chosen as pipelines with AMI_ANTENNA_PIPELINES (own detector: AMI_PIPELINE_TORCHSCRIPT_PATH)"
ADC_IGNORED_VARIABLES = {
    "AMI_LOCALIZATION_MODEL": _MODELS_ARE_PIPELINES,
    "AMI_BINARY_CLASSIFICATION_MODEL": _MODELS_ARE_PIPELINES,
    "AMI_SPECIES_CLASSIFICATION_MODEL": _MODELS_ARE_PIPELINES,
    "AMI_FEATURE_EXTRACTOR": "no feature vectors are computed",
    "AMI_INCLUDE_FEATURES": "results carry no feature vectors",
    "AMI_INCLUDE_LOGITS": "results carry the logits their pipeline produces",
    "AMI_PIPELINES": "set AMI_ANTENNA_PIPELINES instead",
    "AMI_IMAGE_BASE_PATH": "images come from each task's image URL, not a local folder",
    "AMI_IMAGE_BASE_URL": "images come from each task's image URL",
    "AMI_MODEL_BASE_URL": "the weights' mirror is AMI_MODELS_BASE_URL (a copy of ADC's ami-models folder)",
}


# Settings whose empty value means something (metrics off); any other empty value counts as unset.
EMPTY_IS_A_CHOICE = frozenset({"metrics_addr"})


class SettingsError(ValueError):
    """A setting a user can fix: the message is one line naming the variable and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore",
        case_sensitive=False, allow_inf_nan=False,  # "inf" seconds would overflow a timer or socket timeout
    )

    # --- the ADC worker's settings (names and defaults kept) ---
    antenna_api_base_url: str = "http://localhost:8000/api/v2"
    antenna_api_auth_token: Optional[SecretStr] = None
    antenna_service_name: str = "AMI Data Companion"
    antenna_api_batch_size: int = Field(24, ge=1)
    num_workers: int = Field(4, ge=0)
    localization_batch_size: int = Field(8, ge=1)
    classification_batch_size: int = Field(20, ge=1)
    classification_threshold: float = Field(0.6, ge=0.0, le=1.0)
    user_data_path: Path = Field(default_factory=default_user_data_path)
    database_url: Optional[str] = None

    # --- hard-coded in ADC, settings here ---
    antenna_api_dataloader_pin_memory: bool = True
    antenna_api_dataloader_prefetch_factor: int = Field(4, ge=1)
    antenna_api_dataloader_download_threads: int = Field(8, ge=1)
    antenna_api_dataloader_num_workers: Optional[int] = Field(None, ge=0)
    antenna_max_pending_posts: int = Field(5, ge=1)
    antenna_idle_sleep_seconds: float = Field(5.0, ge=0.0)

    # --- this worker's own ---
    antenna_pipelines: str = ""
    antenna_api_timeout_s: float = Field(30.0, gt=0)
    antenna_api_max_attempts: int = Field(6, ge=1)
    antenna_reservation_timeout_s: float = Field(300.0, gt=0)
    antenna_max_post_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)
    max_image_bytes: int = Field(100_000_000, ge=1024)
    max_image_pixels: int = Field(80_000_000, ge=1)
    image_download_deadline_s: float = Field(120.0, gt=0)
    block_private_image_hosts: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    pipeline_torchscript_path: Optional[Path] = None
    pipeline_torchscript_slug: str = "torchscript"
    reference_pipeline_cost: int = Field(1, ge=1, le=100)
    models_base_url: str = "https://object-arbutus.cloud.computecanada.ca/ami-models"
    models_dir: Optional[Path] = None
    result_include_logits: bool = True
    pipeline_idle_evict_s: float = Field(1800.0, ge=0.0)
    gpu_memory_fraction: float = Field(1.0, gt=0.0, le=1.0)
    nats_url: Optional[str] = None

    autotune: bool = True
    # Benchmarks only (benchmarks/run.py): one LoaderPlan as JSON forced on every job; see worker/planning.py.
    benchmark_plan_json: Optional[str] = None
    autotune_probe_tasks: int = Field(3, ge=1, le=32)
    autotune_head_start_tasks: int = Field(64, ge=0, le=256)
    memory_reserve_bytes: int = Field(1024**3, ge=0)
    memory_safety_factor: float = Field(0.85, gt=0.0, le=1.0)
    max_memory_bytes: Optional[int] = Field(None, ge=64 * 1024 * 1024)

    watchdog_enabled: bool = True
    watchdog_interval_s: float = Field(0.25, gt=0.0, le=60.0)
    watchdog_soft_cap_fraction: float = Field(0.70, gt=0.0, lt=1.0)
    watchdog_hard_cap_fraction: float = Field(0.85, gt=0.0, le=1.0)
    watchdog_hard_cap_deadline_s: float = Field(20.0, gt=0.0)

    metrics_addr: str = "127.0.0.1:9464"
    # Ports to try from AMI_METRICS_ADDR's upward when it is busy; 1: a busy port is an error.
    metrics_port_attempts: int = Field(1, ge=1, le=1000)
    # `worker run --processes`: worker processes under one parent (None: one per visible CUDA device, else 1).
    worker_processes: Optional[int] = Field(None, ge=1, le=64)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: float = Field(60.0, gt=0.0)

    @field_validator("antenna_api_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or not parsed.hostname:
            raise ValueError("must be an http(s) URL such as http://localhost:8000/api/v2")
        try:
            parsed.port  # noqa: B018 (raises on a port that is not a number from 0 to 65535)
        except ValueError:
            raise ValueError(f"has a port that is not a number from 0 to 65535: {parsed.netloc}") from None
        return value.rstrip("/")

    @field_validator("models_base_url")
    @classmethod
    def _mirror_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https", "file") or (parsed.scheme != "file" and not parsed.netloc):
            raise ValueError("must be an http(s):// or file:// URL of a copy of ADC's ami-models folder")
        return value.rstrip("/")

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and (":" not in value or not value.rsplit(":", 1)[1].isdigit()
                      or int(value.rsplit(":", 1)[1]) > 65535):
            raise ValueError("must be HOST:PORT (a port from 0 to 65535) such as 127.0.0.1:9464, or empty "
                             "to disable")
        return value

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, values: object) -> object:
        if not isinstance(values, dict):
            return values
        return {name: value for name, value in values.items()
                if not (value == "" and name not in EMPTY_IS_A_CHOICE)}

    @field_validator("*", mode="before")
    @classmethod
    def _size_units(cls, value: object, info: ValidationInfo) -> object:
        if info.field_name and info.field_name.endswith("_bytes") and isinstance(value, str):
            return parse_size_bytes(value)
        return value

    @field_validator("user_data_path", "pipeline_torchscript_path")
    @classmethod
    def _expand_home(cls, value: Optional[Path]) -> Optional[Path]:
        try:
            return value.expanduser() if value is not None else None
        except RuntimeError:  # ~name of a user this system does not have
            raise ValueError(f"starts with {str(value).split('/')[0]}, a home folder this system "
                             "does not know") from None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _caps_ordered(self) -> "Settings":
        if not self.watchdog_soft_cap_fraction < self.watchdog_hard_cap_fraction:
            raise ValueError(
                "AMI_WATCHDOG_SOFT_CAP_FRACTION must be below AMI_WATCHDOG_HARD_CAP_FRACTION "
                f"(got {self.watchdog_soft_cap_fraction} >= {self.watchdog_hard_cap_fraction})"
            )
        return self

    @property
    def dataloader_num_workers(self) -> int:
        """AMI_ANTENNA_API_DATALOADER_NUM_WORKERS wins; else ADC's AMI_NUM_WORKERS."""
        if self.antenna_api_dataloader_num_workers is not None:
            return self.antenna_api_dataloader_num_workers
        return self.num_workers

    @property
    def models_path(self) -> Path:
        """AMI_MODELS_DIR, else <AMI_USER_DATA_PATH>/models."""
        return self.models_dir if self.models_dir is not None else self.user_data_path / "models"

    @property
    def pipeline_slugs(self) -> list[str]:
        return [slug.strip() for slug in self.antenna_pipelines.split(",") if slug.strip()]

    @property
    def token(self) -> str:
        return self.antenna_api_auth_token.get_secret_value() if self.antenna_api_auth_token else ""

    def explicitly_set(self) -> set[str]:
        """Env variable names the operator set (env or .env), as opposed to defaults."""
        return {ENV_PREFIX + name.upper() for name in self.model_fields_set}

    def require_token(self) -> None:
        if not self.token:
            raise SettingsError(
                "AMI_ANTENNA_API_AUTH_TOKEN is not set: set it to the processing service token "
                "from the Antenna admin (Authorization: Token ...)"
            )


def load_settings(env_file: Optional[str] = ".env", **overrides: object) -> Settings:
    """Read settings; raise ``SettingsError`` with one line naming the variable on a bad value."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None


def variable_names(env_file: Optional[str], environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """Names set in the environment and in ``env_file`` (upper case), for ``unused_variable_warnings``."""
    names = set(os.environ if environ is None else environ)
    if env_file and Path(env_file).is_file():
        names |= set(dotenv_values(env_file))
    return {name.upper() for name in names}


def unused_variable_warnings(names: Iterable[str]) -> list[str]:
    """One line per ``AMI_*`` name that is no setting: an ADC setting this worker ignores (and why),
    or a typo with the closest setting's name."""
    known = sorted(ENV_PREFIX + field.upper() for field in Settings.model_fields)
    unused = sorted({name.upper() for name in names if name.upper().startswith(ENV_PREFIX)} - set(known))
    lines = []
    for name in unused:
        if name in ADC_IGNORED_VARIABLES:
            lines.append(f"{name} is an ADC setting this worker ignores: {ADC_IGNORED_VARIABLES[name]}")
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else "`worker config` lists every setting"
        lines.append(f"{name} is not a setting of this worker and is ignored: {hint}")
    return lines


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    if not first["loc"]:  # a cross-field check: its message names the variables itself
        return f"{first['msg'].removeprefix('Value error, ')}; fix it in the environment or .env"
    field = str(first["loc"][0])
    variable = ENV_PREFIX + field.upper()
    given = first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(given, dict) else f"={given}"
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{variable}{shown} is invalid: {message}; fix it in the environment or .env{more}"
