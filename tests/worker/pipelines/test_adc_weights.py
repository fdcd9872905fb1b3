"""Model files: mirror URLs, the cache, ADC's hub cache, downloads that never leave a partial file,
one download for two processes, answers that are not model files, and `worker models fetch/list`."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker.pipelines.catalog import ADC_MODELS_BASE_URL, BINARY
from worker.pipelines.weights import ModelFileError, ModelStore, read_labels
from worker.testing.adc_models import ModelMirror, relative_path

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[3]
URL = ADC_MODELS_BASE_URL + "/moths/classification/blob.pth"
RELATIVE = "moths/classification/blob.pth"
BLOB = b"PK\x03\x04" + bytes(range(256)) * 4096  # 1 MiB that starts as torch's zip checkpoints do
PORTAL_PAGE = b"<!DOCTYPE html>\n<html><body>Sign in to the guest Wi-Fi</body></html>"


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    (root / "moths" / "classification").mkdir(parents=True)
    (root / RELATIVE).write_bytes(BLOB)
    with ModelMirror(root) as server:
        yield server


class _PortalHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PORTAL_PAGE)))
        self.end_headers()
        self.wfile.write(PORTAL_PAGE)


@pytest.fixture
def portal():
    """A captive portal on loopback: every GET is answered 200 with the same HTML page. Yields the
    URL to use for ADC's prefix."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PortalHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="portal", daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ami-models"
    server.shutdown()
    server.server_close()


def store(tmp_path: Path, base_url: str, **kwargs) -> ModelStore:
    return ModelStore(models_dir=tmp_path / "cache", base_url=base_url, **kwargs)


def test_base_url_replaces_adcs_prefix():
    s = ModelStore(models_dir=Path("x"), base_url="file:///srv/ami-models/")
    assert s.source_url(BINARY.weights_url) == "file:///srv/ami-models/moths/classification/" + Path(BINARY.weights_url).name
    assert ModelStore(models_dir=Path("x")).source_url(BINARY.weights_url) == BINARY.weights_url


def test_fetch_downloads_once_into_the_cache(tmp_path, mirror):
    s = store(tmp_path, mirror.base_url)
    path = s.fetch(URL)
    assert path == tmp_path / "cache" / "blob.pth" and path.read_bytes() == BLOB
    assert s.fetch(URL) == path and mirror.requests_for(RELATIVE) == 1
    assert s.locate(URL) == ("cache", path)


def test_a_file_adc_downloaded_into_the_hub_cache_is_used_where_it_is(tmp_path, mirror):
    hub = tmp_path / "hub" / "models"
    hub.mkdir(parents=True)
    (hub / "blob.pth").write_bytes(b"adc's copy")
    s = store(tmp_path, mirror.base_url, hub_dir=hub)
    assert s.fetch(URL) == hub / "blob.pth"
    assert mirror.requests_for(RELATIVE) == 0 and not (tmp_path / "cache" / "blob.pth").exists()


def test_a_download_cut_mid_file_is_retried_and_never_leaves_a_partial_file(tmp_path, mirror):
    mirror.cut(RELATIVE, after_bytes=len(BLOB) // 3, times=1)
    path = store(tmp_path, mirror.base_url).fetch(URL)
    assert path.read_bytes() == BLOB and mirror.requests_for(RELATIVE) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == [".blob.pth.lock", "blob.pth"]


def test_a_cut_download_that_gives_up_leaves_nothing_then_a_restart_completes(tmp_path, mirror):
    mirror.cut(RELATIVE, after_bytes=len(BLOB) // 2, times=2)
    s = store(tmp_path, mirror.base_url, max_attempts=2)
    with pytest.raises(ModelFileError) as error:
        s.fetch(URL)
    assert error.value.problem == "download_failed" and "\n" not in str(error.value)
    assert s.locate(URL)[0] == "absent"  # nothing under the final name: no partial file can be loaded
    assert not list((tmp_path / "cache").glob("*.part")) and not list((tmp_path / "cache").glob(".*.part"))
    assert s.fetch(URL).read_bytes() == BLOB  # the restart
    assert mirror.requests_for(RELATIVE) == 3


def test_a_stale_part_file_of_a_dead_process_is_removed(tmp_path, mirror):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".blob.pth.999999.part").write_bytes(b"half")
    assert store(tmp_path, mirror.base_url).fetch(URL).read_bytes() == BLOB
    assert not (cache / ".blob.pth.999999.part").exists()


def test_a_404_fails_at_once_in_one_line(tmp_path, mirror):
    with pytest.raises(ModelFileError) as error:
        store(tmp_path, mirror.base_url).fetch(ADC_MODELS_BASE_URL + "/moths/classification/absent.pth")
    assert "HTTP 404" in str(error.value) and "AMI_MODELS_BASE_URL" in str(error.value)
    assert mirror.requests_for("moths/classification/absent.pth") == 1


def test_a_file_mirror_is_copied_whole(tmp_path, mirror):
    path = store(tmp_path, "file://" + str(mirror.root)).fetch(URL)
    assert path.read_bytes() == BLOB and mirror.requests_for(RELATIVE) == 0


@pytest.mark.parametrize("url, kind", [(URL, "checkpoint"), (BINARY.labels_url, "labels file")],
                         ids=["weights", "labels"])
def test_an_html_answer_leaves_nothing_in_the_cache_and_a_good_mirror_then_fills_it(
        tmp_path, portal, mirror, url, kind):
    (mirror.root / relative_path(BINARY.labels_url)).write_text('{"moth": 0, "nonmoth": 1}')
    with pytest.raises(ModelFileError) as error:
        store(tmp_path, portal).fetch(url)
    message = str(error.value)
    assert error.value.problem == "wrong_content" and "\n" not in message
    assert store(tmp_path, portal).source_url(url) in message
    assert f"an HTML page (text/html), not a {kind}" in message and "AMI_MODELS_BASE_URL" in message
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    good = store(tmp_path, mirror.base_url)
    assert good.locate(url)[0] == "absent"
    assert good.fetch(url).read_bytes() == (mirror.root / relative_path(url)).read_bytes()
    assert mirror.requests_for(relative_path(url)) == 1


@pytest.mark.parametrize("content, problem", [
    ("Service temporarily unavailable", "not a labels file (not JSON: Expecting value at line 1 column 1)"),
    ('["moth", "nonmoth"]', "not a labels file (not a non-empty JSON object label -> index)")],
    ids=["plain-text", "json-list"])
def test_a_labels_file_that_is_not_adcs_json_is_refused(tmp_path, mirror, content, problem):
    (mirror.root / relative_path(BINARY.labels_url)).write_text(content)
    s = store(tmp_path, mirror.base_url)
    with pytest.raises(ModelFileError) as error:
        s.fetch(BINARY.labels_url)
    assert problem in str(error.value) and "AMI_MODELS_BASE_URL" in str(error.value)
    assert "\n" not in str(error.value) and s.locate(BINARY.labels_url)[0] == "absent"
    assert not list((tmp_path / "cache").glob(".*.part"))


def test_a_page_an_older_version_kept_in_the_cache_is_bad_and_fetched_again(tmp_path, mirror):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "blob.pth").write_bytes(PORTAL_PAGE)
    s = store(tmp_path, mirror.base_url)
    assert s.locate(URL) == ("bad", cache / "blob.pth")
    assert s.fetch(URL).read_bytes() == BLOB and mirror.requests_for(RELATIVE) == 1
    assert s.locate(URL) == ("cache", cache / "blob.pth")


@pytest.mark.parametrize("models_dir", ["a-file", "a-file/models"])
def test_worker_models_fetch_into_an_unusable_models_dir_is_one_line_and_exit_2(tmp_path, models_dir):
    (tmp_path / "a-file").write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update({"PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "torch"),
                "AMI_MODELS_DIR": str(tmp_path / models_dir), "AMI_MODELS_BASE_URL": "file://" + str(tmp_path)})
    done = subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "models", "fetch",
                           "--pipelines", "moth_binary"], env=env, capture_output=True, text=True, timeout=100,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"worker: AMI_MODELS_DIR={tmp_path / models_dir} "), lines
    assert (tmp_path / "a-file").read_text() == "not a folder"


FETCH_SCRIPT = """
import sys, time
from pathlib import Path
from worker.pipelines.weights import ModelStore
Path(sys.argv[4]).touch()
while not Path(sys.argv[5]).exists():
    time.sleep(0.01)
print(ModelStore(models_dir=Path(sys.argv[1]), base_url=sys.argv[2]).fetch(sys.argv[3]))
"""


def test_two_processes_fetching_at_once_download_once(tmp_path, mirror):
    mirror.slow(RELATIVE, delay_s=1.0, times=2)  # whoever downloads first holds the file for 1 s
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, str(cache), mirror.base_url, URL,
                               str(tmp_path / f"ready{i}"), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline_s = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline_s:
        time.sleep(0.01)
    go.touch()  # both imported and waiting: they call fetch within milliseconds of each other
    outputs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert mirror.requests_for(RELATIVE) == 1
    assert (cache / "blob.pth").read_bytes() == BLOB


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "not a non-empty JSON object"), ('{"a": 0, "b": 2}', "not exactly 0..1"),
    ('{"a": 0, "b": "1"}', "integer"), ('{"a": 0, "b": 0, "c": 2}', "not exactly 0..1"), ('{"a": 0', "unreadable")])
def test_bad_labels_files_are_one_line(tmp_path, content, problem):
    path = tmp_path / "labels.json"
    path.write_text(content)
    with pytest.raises(ModelFileError) as error:
        read_labels(path)
    assert problem in str(error.value) and "\n" not in str(error.value)


def test_a_repeated_index_keeps_its_last_label_as_adc_does_and_says_so(tmp_path, caplog):
    """ADC inverts the file (index -> label), so the last label of an index wins; a file ADC's
    worker serves must not stop this one from starting (before: refused, the pipeline unusable)."""
    path = tmp_path / "labels.json"
    path.write_text('{"Agrotis": 0, "nonmoth": 1, "Agrotis ipsilon": 0}')
    with caplog.at_level(logging.WARNING):
        assert read_labels(path) == ("Agrotis ipsilon", "nonmoth")
    assert "index 0" in caplog.text and "'Agrotis'" in caplog.text and "'Agrotis ipsilon'" in caplog.text


def test_labels_come_back_in_index_order(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"nonmoth": 1, "moth": 0}))
    assert read_labels(path) == ("moth", "nonmoth")


def test_worker_models_fetch_then_list(tmp_path, monkeypatch, capsys):
    import torch

    from worker.cli import main

    root = tmp_path / "mirror"
    for url in (BINARY.weights_url, BINARY.labels_url):
        (root / relative_path(url)).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.zeros(2, 2)}, root / relative_path(BINARY.weights_url))  # `fetch` checks it is whole
    (root / relative_path(BINARY.labels_url)).write_text('{"moth": 0, "nonmoth": 1}')
    for name in [n for n in os.environ if n.startswith("AMI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AMI_MODELS_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AMI_MODELS_BASE_URL", "file://" + str(root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def worker(*args: str) -> tuple[int, str, str]:
        code = main(["--env-file", "/dev/null", "models", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = worker("list", "--pipelines", "moth_binary")
    assert code == 1 and out.count("missing") == 4  # 3 files + the summary line
    code, out, _ = worker("fetch", "--pipelines", "moth_binary")
    assert code == 1 and "FAILED  fasterrcnn_resnet50_fpn_tz53qv9v.pt" in out  # the mirror has no detector
    assert (tmp_path / "cache" / Path(BINARY.weights_url).name).is_file()
    code, out, _ = worker("list", "--pipelines", "moth_binary")
    assert out.count("cache ") == 2 and "1 missing" in out
    (tmp_path / "cache" / Path(BINARY.labels_url).name).write_bytes(PORTAL_PAGE)  # as an older version kept it
    code, out, _ = worker("list", "--pipelines", "moth_binary")
    assert code == 1 and "1 missing, 1 bad" in out and "an HTML page (starts with <), not a labels file" in out
    code, _, err = worker("fetch", "--pipelines", "nope")
    assert code == 2 and err.count("\n") == 1 and "nope" in err


def test_an_unreachable_source_fails_the_next_file_at_once(tmp_path):
    dead = ModelMirror(tmp_path)  # bound, never started, then closed: connections are refused
    base_url = dead.base_url
    dead._server.server_close()
    s = store(tmp_path, base_url, max_attempts=2)
    with pytest.raises(ModelFileError):
        s.fetch(URL)
    started_s = time.monotonic()
    with pytest.raises(ModelFileError) as error:
        s.fetch(BINARY.labels_url)
    assert time.monotonic() - started_s < 0.5 and "unreachable moments ago" in str(error.value)
    assert "\n" not in str(error.value)
