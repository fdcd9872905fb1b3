"""Metrics over real HTTP from a real ``worker run`` subprocess against the local server.

One module-scoped run: a shaped job (so a scrape lands mid-job), a scrape during and one after,
then the checks: counters equal the server's own counts, ``promtool check metrics`` passes, every
metric the Grafana dashboard queries exists in the scrape, and the token appears nowhere.
"""
from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import time
from typing import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, TOKEN, worker_env
from tests.worker.worker_process import WorkerProcess, worker_command
from worker.testing.antenna_server import LocalAntenna
from worker.middleware.prometheus import MetricsServer, parse_addr, queued_after, queued_after_batch
from worker.testing.synthetic import generate_preset

DASHBOARD = ROOT / "dashboards" / "antenna-worker.json"
FAULTS = {0: "404", 3: "corrupt"}
IMAGES = 12
API_FAULTS = [503, 502]
ALERTS = ROOT / "dashboards" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "dashboards" / "prometheus.yml"


def ensure_promtool() -> str:
    """promtool from Debian's ``prometheus`` package, installed here when missing (root + apt)."""
    found = shutil.which("promtool")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("promtool is missing and cannot be installed here (needs root and apt-get: "
                    "apt-get install -y prometheus)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"apt-get install prometheus failed: {done.stderr.strip()[-300:]}")
    return shutil.which("promtool") or pytest.skip("the prometheus package installed no promtool")


def exposed_names(text: str) -> set[str]:
    """Sample names in the scrape, plus declared families with no sample yet (a labelled metric
    whose labels never occurred, e.g. watchdog actions on a calm run): a query on those is valid."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "info": ("_info",)}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(scraped: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in scraped.items()
               if sample == name and all((k, v) in sample_labels for k, v in labels.items()))


class Run:
    def __init__(self, during: str, after: str, report, output: str, exit_code: int, job_id: int,
                 started_unix_s: float, scraped_unix_s: float) -> None:
        self.during, self.after, self.report, self.output = during, after, report, output
        self.exit_code, self.job_id = exit_code, job_id
        self.started_unix_s, self.scraped_unix_s = started_unix_s, scraped_unix_s


def _scrape(url: str) -> str:
    response = requests.get(url, timeout=5)
    response.raise_for_status()
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Run]:
    tmp_path = tmp_path_factory.mktemp("observability")
    from tests.conftest import data_cache

    images = generate_preset(data_cache(), "tiny", 40, seed=3)[:IMAGES]
    with LocalAntenna(token=TOKEN, rng_seed=0) as antenna:
        # ~0.15 s per request, one download at a time: the job lasts seconds, so a scrape lands mid-job.
        antenna.set_network(latency_s=0.15)
        antenna.set_faults("jobs", API_FAULTS, retry_after_s=0.0)  # the first poll is retried past these
        started_unix_s = time.time()
        job_id = antenna.add_job(images, "synthetic-moths",
                                 image_faults={images[i].image_id: kind for i, kind in FAULTS.items()})
        env = worker_env(antenna, tmp_path, AMI_METRICS_ADDR="127.0.0.1:0", AMI_AUTOTUNE="false",
                         AMI_ANTENNA_API_BATCH_SIZE="2", AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0",
                         AMI_ANTENNA_API_DATALOADER_DOWNLOAD_THREADS="1", AMI_WATCHDOG_INTERVAL_S="0.1",
                         AMI_LOG_LEVEL="DEBUG")
        worker = WorkerProcess(["run"], env, tmp_path)
        try:
            url = worker.wait_for(r"metrics on (http://\S+/metrics)", 60).group(1)
            worker.wait_for(rf"job {job_id}: loader plan", 60)
            during = _scrape(url)
            worker.wait_for(rf"job {job_id}: {IMAGES} images", 120)
            # the job's line means processed; results are posted on their own thread
            after = _scrape_until_posted(url, IMAGES)
            scraped_unix_s = time.time()
            report = antenna.report(job_id)
            worker.send(signal.SIGTERM)
            code = worker.wait(60)
        finally:
            worker.kill()
        yield Run(during, after, report, worker.output, code, job_id, started_unix_s, scraped_unix_s)


def _scrape_until_posted(url: str, expected: int) -> str:
    """The server counts a result before its 200 reaches the worker: poll briefly for the poster's count."""
    deadline_s = time.monotonic() + 10
    while True:
        text = _scrape(url)
        if total(samples(text), "antenna_worker_results_posted_total") >= expected or time.monotonic() > deadline_s:
            return text
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_counters_equal_the_servers_own_counts(run):
    assert run.exit_code == 0, run.output[-3000:]
    report, scraped = run.report, samples(run.after)
    assert (report.results_ok, report.results_error, report.lost, report.complete) == (IMAGES - 2, 2, 0, True)
    assert total(scraped, "antenna_worker_images_processed_total", pipeline="synthetic-moths") == report.results_ok
    assert total(scraped, "antenna_worker_images_failed_total") == report.results_error
    assert total(scraped, "antenna_worker_images_failed_total", reason="not_found") == 1
    assert total(scraped, "antenna_worker_images_failed_total", reason="not_an_image") == 1
    assert total(scraped, "antenna_worker_results_posted_total") == report.results_ok + report.results_error
    assert total(scraped, "antenna_worker_tasks_reserved_total") == report.delivered == IMAGES
    assert total(scraped, "antenna_worker_results_spooled_total") == 0
    batches = total(scraped, "antenna_worker_batches_total")
    assert batches == IMAGES / 2
    assert total(scraped, "antenna_worker_inference_seconds_count") == batches
    assert total(scraped, "antenna_worker_download_seconds_count") == report.results_ok
    assert total(scraped, "antenna_worker_decode_seconds_count") == report.results_ok
    assert total(scraped, "antenna_worker_post_seconds_count") >= 1
    # Every downloaded byte of the ok images, as the server sent them (faulty bodies are not counted).
    assert 0 < total(scraped, "antenna_worker_download_bytes_total") <= report.media_bytes_served
    assert total(scraped, "antenna_worker_jobs_total") == 1
    assert total(scraped, "antenna_worker_plan_value", knob="batch_size") == 2
    assert total(scraped, "antenna_worker_plan_changes_total", source="settings") == 1
    assert total(scraped, "antenna_worker_build_info", version="0.1.0") == 1


@pytest.mark.timeout(240)
def test_mid_job_scrape_shows_progress_memory_and_caps(run):
    during, after = samples(run.during), samples(run.after)
    assert total(during, "antenna_worker_current_job_id") == run.job_id
    assert total(during, "antenna_worker_state", state="working") == 1
    assert total(during, "antenna_worker_job_images_done") < IMAGES
    assert total(after, "antenna_worker_job_images_done") == IMAGES
    assert total(after, "antenna_worker_job_tasks_queued") == 0  # the last task left none queued
    assert total(after, "antenna_worker_current_job_id") == 0
    used = total(after, "antenna_worker_memory_used_bytes")
    effective = total(after, "antenna_worker_memory_limit_bytes", kind="effective")
    soft = total(after, "antenna_worker_memory_limit_bytes", kind="soft_cap")
    hard = total(after, "antenna_worker_memory_limit_bytes", kind="hard_cap")
    assert 50 * 2**20 < used < soft < hard < effective
    assert total(after, "antenna_worker_open_fds") > 3
    assert total(after, "antenna_worker_processes") >= 1


@pytest.mark.timeout(120)
def test_promtool_check_metrics_passes_on_the_scrape(run):
    promtool = ensure_promtool()
    for text in (run.during, run.after):
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    exprs += [v["query"] if isinstance(v["query"], str) else v["query"]["query"]
              for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "without", "max", "min", "avg", "count", "topk", "bottomk",
    "histogram_quantile", "clamp_min", "clamp_max", "label_values", "changes", "resets", "on", "ignoring",
    "group_left", "group_right", "and", "or", "unless", "offset", "delta", "deriv", "abs", "time", "vector",
    "scalar", "max_over_time", "min_over_time", "avg_over_time", "le", "bool", "absent", "sort_desc",
}


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are metric names (not functions, labels or keywords)."""
    without_strings = re.sub(r'"[^"]*"', '""', re.sub(r"label_values\(([^,)]+),[^)]*\)", r"\1", expr))
    without_braces = re.sub(r"\{[^}]*\}", "", without_strings)
    without_grouping = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_braces)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_grouping)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_ranges)) - PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d+|e\d+|\$\w+|__\w+", n) and "$" not in n}


@pytest.mark.timeout(60)
def test_every_dashboard_metric_exists_in_a_live_scrape(run):
    exposed = exposed_names(run.after)
    exprs = dashboard_expressions()
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    assert used and all(name.startswith(("antenna_worker_", "process_")) for name in used), used
    missing = sorted(used - exposed)
    assert not missing, f"dashboard queries metrics the worker does not export: {missing}"
    for needed in ("antenna_worker_images_processed_total", "antenna_worker_memory_used_bytes",
                   "antenna_worker_plan_changes_total", "antenna_worker_images_failed_total",
                   "antenna_worker_posts_pending"):
        assert needed in used


def family_types(text: str) -> dict[str, str]:
    """Every sample name in the scrape -> its family's type (counter, gauge, histogram, ...)."""
    types = {}
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "info": ("_info",)}.get(family.type, ("",))
        types.update({family.name + suffix: family.type for suffix in suffixes})
    return types


def alert_expressions() -> list[str]:
    import yaml

    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.mark.timeout(60)
def test_rate_and_increase_apply_only_to_counters(run):
    """rate() of a gauge holding a running total is wrong (a restart reads as a huge negative rate)."""
    types = family_types(run.after)
    for expr in dashboard_expressions() + alert_expressions():
        for name in re.findall(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", expr):
            assert types.get(name) in ("counter", "histogram"), (name, types.get(name), expr)


@pytest.mark.timeout(60)
def test_process_collectors_build_labels_api_errors_last_success_and_spool(run):
    import torch

    scraped = samples(run.after)
    assert total(scraped, "process_cpu_seconds_total") > 0
    assert total(scraped, "process_resident_memory_bytes") > 50 * 2**20
    assert total(scraped, "antenna_worker_build_info", version="0.1.0", torch=torch.__version__,
                 cuda=torch.version.cuda or "none", device="cpu") == 1
    assert total(scraped, "antenna_worker_watchdog_sampler_cpu_seconds_total") > 0
    for status in API_FAULTS:
        assert total(scraped, "antenna_worker_api_errors_total", endpoint="/jobs/", status=str(status)) == 1
    assert total(scraped, "antenna_worker_api_errors_total") == len(API_FAULTS)
    last_success = total(scraped, "antenna_worker_api_last_success_timestamp_seconds")
    assert run.started_unix_s < last_success <= run.scraped_unix_s
    assert ("antenna_worker_spool_files", ()) in scraped and total(scraped, "antenna_worker_spool_files") == 0
    assert total(scraped, "antenna_worker_spool_bytes") == 0


@pytest.mark.timeout(30)
def test_the_spool_backlog_is_read_from_disk(tmp_path):
    from worker.metrics import REGISTRY
    from worker.middleware.prometheus import read_spool_backlog
    from worker.posting import Spool

    spool = Spool(tmp_path / "spool")
    read_spool_backlog(spool)
    assert REGISTRY.get_sample_value("antenna_worker_spool_files") == 0
    written = [spool.write(7, [{"reply_subject": "s", "result": {}}]) for _ in range(3)]
    read_spool_backlog(spool)  # as a fresh process finds what an earlier one left
    assert REGISTRY.get_sample_value("antenna_worker_spool_files") == 3
    assert REGISTRY.get_sample_value("antenna_worker_spool_bytes") == sum(p.stat().st_size for p in written)


@pytest.mark.timeout(120)
def test_alert_rules_and_scrape_config_pass_promtool_and_query_exported_metrics(run, tmp_path):
    promtool = ensure_promtool()
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # check config also loads the rule files the example names, relative to the config
    shutil.copy(SCRAPE_CONFIG, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    exposed = exposed_names(run.after) | {"up"}
    used = set().union(*(metric_names(expr) for expr in alert_expressions()))
    assert sorted(used - exposed) == []
    names = {rule["alert"] for group in __import__("yaml").safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]}
    assert {"AntennaWorkerDown", "AntennaWorkerNoSuccessfulPoll", "AntennaWorkerSpoolGrowing",
            "AntennaWorkerMemoryAboveSoftCap", "AntennaWorkerImagesFailing"} <= names


@pytest.mark.timeout(120)
def test_alerts_fire_on_their_conditions(tmp_path):
    """promtool's rule unit tests: each alert fires on synthetic series and stays quiet on healthy ones."""
    promtool = ensure_promtool()
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    shutil.copy(ROOT / "tests" / "worker" / "middleware" / "alerts_test.yml", tmp_path / "alerts_test.yml")
    done = subprocess.run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_imports_anywhere_and_keeps_ids_off_count_axes():
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    for panel in panels:
        if "datasource" in panel:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        exprs = [target["expr"] for target in panel.get("targets", [])]
        if any("current_job_id" in expr for expr in exprs):
            assert len(exprs) == 1 and panel["type"] == "stat", panel["title"]


@pytest.mark.timeout(60)
def test_the_token_is_in_no_log_line_or_metric(run):
    assert TOKEN not in run.output
    assert TOKEN not in run.during and TOKEN not in run.after
    assert "Authorization" not in run.output


@pytest.mark.timeout(30)
def test_metrics_server_binds_port_zero_and_stops(tmp_path):
    calls = []
    server = MetricsServer("127.0.0.1:0", on_scrape=lambda: calls.append(1)).start()
    try:
        text = _scrape(server.url)
        assert "antenna_worker_build_info" in text and calls == [1]
    finally:
        server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url, timeout=2)


@pytest.mark.timeout(10)
def test_address_and_reply_subject_parsing():
    assert parse_addr("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_addr("[::1]:9") == ("::1", 9)
    assert parse_addr(":9464") == ("0.0.0.0", 9464)
    with pytest.raises(ValueError, match="AMI_METRICS_ADDR"):
        parse_addr("localhost")
    assert queued_after("$JS.ACK.job_1.job-1-workers.1.5.5.1700000000000000000.7") == 7
    assert queued_after("$JS.ACK.dom.acc.job_1.job-1-workers.1.5.5.1700000000000000000.3.tok") == 3
    assert queued_after("$JS.ACK.job_1.job-1-workers.1.5.5") is None
    assert queued_after("opaque-subject") is None


def test_a_batch_out_of_delivery_order_counts_its_latest_delivered_task():
    """A lane decodes downloads in the order they finish, so a batch's last item can be an earlier
    delivery: the fresh-clone CI run drew ``8/~9`` for a job of 8 done (the last item's pending 1,
    the other's 0). The smallest pending count of the batch is the queue after it."""
    from types import SimpleNamespace

    def item(pending: str):
        return SimpleNamespace(task=SimpleNamespace(reply_subject=f"$JS.ACK.job_1.job-1-workers.1.5.5.1700000000000000000.{pending}"))

    assert queued_after_batch([item("0"), item("1")]) == 0
    assert queued_after_batch([item("3"), SimpleNamespace(task=SimpleNamespace(reply_subject="opaque")), item("2")]) == 2
    assert queued_after_batch([SimpleNamespace(task=SimpleNamespace(reply_subject="opaque"))]) is None
    assert queued_after_batch([]) is None


@pytest.mark.timeout(120)
def test_json_log_lines_for_journald(antenna, tiny_images, tmp_path):
    job_id = antenna.add_job(tiny_images[:4], "synthetic-moths", image_faults={tiny_images[0].image_id: "404"})
    env = worker_env(antenna, tmp_path, AMI_LOG_FORMAT="json", AMI_AUTOTUNE="false", AMI_LOG_LEVEL="DEBUG",
                     AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0")
    done = subprocess.run(worker_command("run", "--burst"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message", "pid"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert f"job {job_id}: 4 images (3 ok, 1 failed)" in " ".join(messages)
    assert any(r["logger"] == "worker.middleware.progress" and r["level"] == "debug" for r in records)
    assert "\r" not in done.stderr  # no progress redraws off a TTY
    assert TOKEN not in done.stderr + done.stdout


@pytest.mark.timeout(120)
def test_progress_line_is_redrawn_on_a_tty(antenna, tiny_images, tmp_path):
    job_id = antenna.add_job(tiny_images[:8], "synthetic-moths")
    env = worker_env(antenna, tmp_path, AMI_AUTOTUNE="false", AMI_ANTENNA_API_BATCH_SIZE="2",
                     AMI_ANTENNA_API_DATALOADER_NUM_WORKERS="0")
    master, slave = pty.openpty()
    process = subprocess.Popen(worker_command("run", "--burst"), env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert process.wait(timeout=60) == 0
    output = b"".join(chunks).decode(errors="replace")
    redraws = re.findall(rf"\r\x1b\[Kjob {job_id}: (\d+)/~(\d+) images  [\d.]+ images/s  "
                         r"mem [\d.]+/[\d.]+ GiB \(\d+% of soft cap\)", output)
    assert redraws and redraws[-1] == ("8", "8"), output[-2000:]
    # The finished line ends with a newline, and log lines never start glued to a bar.
    assert re.search(rf"job {job_id}: 8/~8 images[^\r\n]*\r?\n", output)
    assert not re.search(r"images/s[^\r\n]*\d{4}-\d\d-\d\d \d\d:\d\d", output)
    assert TOKEN not in output
