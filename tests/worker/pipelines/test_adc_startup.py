"""What the worker offers by default, and start-up checks of ADC's model files."""
from __future__ import annotations

import pytest
import torch

from worker.app import offered_slugs, pipeline_loader, preload_pipelines
from worker.pipelines.catalog import ADC_SLUGS, BINARY, DETECTOR
from worker.settings import SettingsError, load_settings
from worker.testing.adc_models import relative_path

pytestmark = pytest.mark.timeout(60)


def test_unset_pipelines_offer_adcs_ten_and_reference_ones_only_when_named(tmp_path):
    defaults = load_settings(env_file=None, user_data_path=tmp_path)
    assert offered_slugs(defaults) == list(ADC_SLUGS)
    assert "synthetic-moths" not in offered_slugs(defaults) and "null" not in offered_slugs(defaults)
    named = load_settings(env_file=None, antenna_pipelines="synthetic-moths,null")
    assert offered_slugs(named) == ["synthetic-moths", "null"]
    scripted = load_settings(env_file=None, pipeline_torchscript_path=tmp_path / "m.pt")
    assert offered_slugs(scripted) == list(ADC_SLUGS) + ["torchscript"]


def test_models_settings(tmp_path):
    settings = load_settings(env_file=None, user_data_path=tmp_path)
    assert settings.models_path == tmp_path / "models"
    assert settings.models_base_url == "https://object-arbutus.cloud.computecanada.ca/ami-models"
    assert settings.result_include_logits and settings.pipeline_idle_evict_s == 1800
    with pytest.raises(SettingsError) as error:
        load_settings(env_file=None, models_base_url="ftp://mirror/ami-models")
    assert str(error.value).startswith("AMI_MODELS_BASE_URL=ftp://mirror/ami-models is invalid")


def _mirror_with_labels(root) -> None:
    path = root / relative_path(BINARY.labels_url)
    path.parent.mkdir(parents=True)
    path.write_text('{"moth": 0, "nonmoth": 1}')


def _settings(tmp_path, root):
    return load_settings(env_file=None, antenna_pipelines="moth_binary", user_data_path=tmp_path / "data",
                         models_base_url="file://" + str(root))


def test_a_missing_weights_file_stops_the_start_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    root = tmp_path / "mirror"
    _mirror_with_labels(root)
    settings = _settings(tmp_path, root)
    with pytest.raises(SettingsError) as error:
        preload_pipelines(settings, pipeline_loader(settings, torch.device("cpu")))
    message = str(error.value)
    assert "\n" not in message and "'moth_binary'" in message and "AMI_MODELS_BASE_URL" in message


def test_a_truncated_checkpoint_in_adcs_hub_cache_stops_the_start_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "models"
    hub.mkdir(parents=True)
    torch.save({"w": torch.zeros(1000)}, hub / "whole.pt")
    data = (hub / "whole.pt").read_bytes()
    (hub / relative_path(DETECTOR.weights_url).rsplit("/", 1)[1]).write_bytes(data[: len(data) // 2])
    root = tmp_path / "mirror"
    _mirror_with_labels(root)
    settings = _settings(tmp_path, root)
    with pytest.raises(SettingsError) as error:
        preload_pipelines(settings, pipeline_loader(settings, torch.device("cpu")))
    message = str(error.value)
    assert "\n" not in message and "fasterrcnn_resnet50_fpn_tz53qv9v.pt" in message and "delete it" in message


def test_register_with_an_unreachable_labels_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import os

    from worker.cli import main

    for name in [n for n in os.environ if n.startswith("AMI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AMI_ANTENNA_API_AUTH_TOKEN", "t")
    monkeypatch.setenv("AMI_ANTENNA_PIPELINES", "moth_binary")
    monkeypatch.setenv("AMI_MODELS_BASE_URL", "file://" + str(tmp_path / "no-mirror"))
    monkeypatch.setenv("AMI_MODELS_DIR", str(tmp_path / "cache"))
    assert main(["--env-file", os.devnull, "register"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'moth_binary' cannot be registered" in err and "05-moth-nonmoth" in err


@pytest.mark.timeout(300)
def test_the_daemon_runs_an_adc_pipeline_job_with_nothing_lost(antenna, settings_for, tmp_path):
    """The whole path once, in process: build_worker fetches the stand-in files from a file://
    mirror, warms the pipeline up, and a burst run posts both images' results to the local server."""
    from tests.conftest import data_cache
    from worker.app import build_worker
    from worker.testing.adc_models import write_models
    from worker.testing.synthetic import generate_images

    root = tmp_path / "mirror"
    write_models(root, ["moth_binary"])
    images = generate_images(data_cache() / "adc-320x240", 2, 320, 240, quality=85, seed=7, noise=4.0, prefix="adc-")
    job = antenna.add_job(images, "moth_binary")
    settings = settings_for(antenna, antenna_pipelines="moth_binary", models_base_url="file://" + str(root),
                            antenna_api_dataloader_num_workers=0)
    assert build_worker(settings, burst=True, middlewares=[]).run() == 0
    report = antenna.report(job)
    assert report.results_ok == 2 and report.results_error == 0 and report.lost == 0 and report.complete
    assert (settings.models_path / "moth-nonmoth_resnet50_20240417_b4fe3efe.pth").is_file()
