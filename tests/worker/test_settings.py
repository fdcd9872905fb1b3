"""Settings as an operator writes them: sizes with units, ``~`` in paths, empty values, typos and
ADC variables this worker does not use."""
from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import ENV_PREFIX, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


@pytest.fixture(autouse=True)
def _no_ami_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _load(tmp_path: Path, text: str) -> Settings:
    env_file = tmp_path / "worker.env"
    env_file.write_text(text)
    return load_settings(env_file=str(env_file))


@pytest.mark.timeout(30)
def test_env_example_pins_nothing_but_the_url_and_token(tmp_path):
    example = (ROOT / ".env.example").read_text()
    assert load_settings(env_file=str(ROOT / ".env.example")).explicitly_set() <= {
        "AMI_ANTENNA_API_BASE_URL", "AMI_ANTENNA_API_AUTH_TOKEN"}
    filled = example.replace("AMI_ANTENNA_API_AUTH_TOKEN=\n", "AMI_ANTENNA_API_AUTH_TOKEN=abcdef123456\n")
    settings = _load(tmp_path, filled)
    assert settings.explicitly_set() == {"AMI_ANTENNA_API_BASE_URL", "AMI_ANTENNA_API_AUTH_TOKEN"}
    assert settings.token == "abcdef123456"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("text", "expected_bytes"), [
    ("4GiB", 4 * GIB), ("512MiB", 512 * 1024**2), ("1.5G", int(1.5 * GIB)), ("8589934592", 8 * GIB),
    ("2 gib", 2 * GIB), ("3GB", 3 * 10**9), ("64m", 64 * 1024**2),
])
def test_sizes_accept_units(tmp_path, text, expected_bytes):
    settings = _load(tmp_path, f"AMI_MAX_MEMORY_BYTES={text}\nAMI_MEMORY_RESERVE_BYTES={text}\n"
                               f"AMI_MAX_IMAGE_BYTES={text}\nAMI_ANTENNA_MAX_POST_BYTES={text}\n")
    assert settings.max_memory_bytes == settings.memory_reserve_bytes == expected_bytes
    assert settings.max_image_bytes == settings.antenna_max_post_bytes == expected_bytes


@pytest.mark.timeout(30)
def test_every_bytes_setting_takes_units():
    for name in Settings.model_fields:
        if name.endswith("_bytes"):
            assert getattr(load_settings(env_file=None, **{name: "1GiB"}), name) == GIB, name


@pytest.mark.timeout(30)
def test_a_bad_size_is_one_line_naming_the_variable(tmp_path):
    with pytest.raises(SettingsError) as caught:
        _load(tmp_path, "AMI_MAX_MEMORY_BYTES=4 parsecs\n")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("AMI_MAX_MEMORY_BYTES=4 parsecs is invalid") and "GiB" in message
    from worker.settings import parse_size_bytes

    with pytest.raises(ValueError):
        parse_size_bytes("-1G")


@pytest.mark.timeout(30)
def test_paths_expand_home(tmp_path):
    settings = _load(tmp_path, "AMI_USER_DATA_PATH=~/ami-data\nAMI_PIPELINE_TORCHSCRIPT_PATH=~/models/d.pt\n")
    assert settings.user_data_path == Path.home() / "ami-data"
    assert settings.pipeline_torchscript_path == Path.home() / "models" / "d.pt"


@pytest.mark.timeout(30)
def test_empty_values_count_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("AMI_NUM_WORKERS", "")
    settings = _load(tmp_path, "AMI_ANTENNA_API_BATCH_SIZE=\nAMI_MAX_MEMORY_BYTES=\nAMI_DEVICE=\n")
    assert (settings.num_workers, settings.antenna_api_batch_size, settings.max_memory_bytes) == (4, 24, None)
    assert settings.explicitly_set() == set()


@pytest.mark.timeout(30)
def test_an_unknown_variable_gets_a_warning_naming_the_closest_setting():
    from worker.settings import unused_variable_warnings

    (warning,) = unused_variable_warnings({"AMI_ANTENA_API_BATCH_SIZE", "AMI_NUM_WORKERS", "HOME"})
    assert warning.startswith("AMI_ANTENA_API_BATCH_SIZE is not a setting")
    assert "did you mean AMI_ANTENNA_API_BATCH_SIZE?" in warning
    (far,) = unused_variable_warnings({"AMI_XYZZY"})
    assert "did you mean" not in far and "worker config" in far


@pytest.mark.timeout(30)
def test_adc_settings_this_worker_ignores_get_one_warning_each():
    from worker.settings import ADC_IGNORED_VARIABLES, unused_variable_warnings

    for name in ("AMI_LOCALIZATION_MODEL", "AMI_IMAGE_BASE_PATH", "AMI_SPECIES_CLASSIFICATION_MODEL"):
        assert name in ADC_IGNORED_VARIABLES
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert fields.isdisjoint(ADC_IGNORED_VARIABLES)
    warnings = unused_variable_warnings(set(ADC_IGNORED_VARIABLES) | {"ami_localization_model"})
    assert len(warnings) == len(ADC_IGNORED_VARIABLES)
    for name, warning in zip(sorted(ADC_IGNORED_VARIABLES), warnings):
        assert warning.startswith(f"{name} is an ADC setting this worker ignores: "), warning


@pytest.mark.timeout(30)
def test_an_empty_metrics_address_still_disables_metrics(tmp_path):
    settings = _load(tmp_path, "AMI_METRICS_ADDR=\n")
    assert settings.metrics_addr == "" and settings.explicitly_set() == {"AMI_METRICS_ADDR"}
