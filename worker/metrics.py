"""Prometheus metrics: one registry, every metric the worker exports, named by convention
(base units in names, ``_total`` counters). Mechanism and middlewares update these objects;
``worker/middleware/prometheus.py`` serves them on AMI_METRICS_ADDR.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector

from worker import __version__

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (this process: CPU seconds, resident memory, open FDs, start time) and python_info.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

build_info = Info("antenna_worker_build", "Version of the running worker; torch, its CUDA build and the device "
                  "once the worker has started.", registry=REGISTRY)
build_info.info({"version": __version__})

images_processed = Counter("antenna_worker_images_processed_total", "Images that got a success result.",
                           ["pipeline"], registry=REGISTRY)
images_failed = Counter("antenna_worker_images_failed_total", "Images that got an error result, by reason.",
                        ["pipeline", "reason"], registry=REGISTRY)
download_bytes = Counter("antenna_worker_download_bytes_total", "Compressed image bytes downloaded.",
                         registry=REGISTRY)
download_seconds = Histogram("antenna_worker_download_seconds", "Seconds to download one image.",
                             buckets=_SECONDS_BUCKETS, registry=REGISTRY)
decode_seconds = Histogram("antenna_worker_decode_seconds", "Seconds to decode one image.",
                           buckets=_SECONDS_BUCKETS, registry=REGISTRY)
inference_seconds = Histogram("antenna_worker_inference_seconds", "Seconds of model inference per batch.",
                              ["pipeline"], buckets=_SECONDS_BUCKETS, registry=REGISTRY)
post_seconds = Histogram("antenna_worker_post_seconds", "Seconds per result POST (retries included).",
                         buckets=_SECONDS_BUCKETS, registry=REGISTRY)
tasks_reserved = Counter("antenna_worker_tasks_reserved_total", "Tasks reserved from the API.",
                         registry=REGISTRY)
tasks_stranded = Counter("antenna_worker_tasks_stranded_total",
                         "Reserved tasks given back or left for redelivery unprocessed.", registry=REGISTRY)
results_posted = Counter("antenna_worker_results_posted_total", "Results the API accepted.", registry=REGISTRY)
results_spooled = Counter("antenna_worker_results_spooled_total", "Results spooled to disk (API unreachable).",
                          registry=REGISTRY)
results_replayed = Counter("antenna_worker_results_replayed_total", "Spooled results posted later.",
                           registry=REGISTRY)
results_job_gone = Counter("antenna_worker_results_job_gone_total",
                           "Results dropped because their job was deleted (HTTP 404).", registry=REGISTRY)
results_spool_failed = Counter("antenna_worker_results_spool_failed_total",
                               "Results neither posted nor spooled (spool write failed): their tasks are "
                               "stranded.", registry=REGISTRY)
spool_corrupt_files = Counter("antenna_worker_spool_corrupt_files_total",
                              "Unreadable spool files moved to spool/corrupt/.", registry=REGISTRY)
jobs_rejecting_results = Gauge("antenna_worker_jobs_rejecting_results",
                               "Jobs whose every result the server rejects (HTTP 400 for all): their results "
                               "are held in the spool.", registry=REGISTRY)
api_auth_failures = Counter("antenna_worker_api_auth_failures_total",
                            "API calls answered 401/403 (main process: listings, result posts).", registry=REGISTRY)
posts_pending = Gauge("antenna_worker_posts_pending", "Result POSTs queued or in flight.", registry=REGISTRY)
batches = Counter("antenna_worker_batches_total", "Batches inferred.", ["pipeline"], registry=REGISTRY)
api_retries = Counter("antenna_worker_api_retries_total", "API calls retried after errors.", registry=REGISTRY)
api_errors = Counter("antenna_worker_api_errors_total", "Failed API attempts (retried or not), by endpoint (ids as "
                     "{id}) and status (HTTP code, or connection / timeout).", ["endpoint", "status"], registry=REGISTRY)
api_last_success = Gauge("antenna_worker_api_last_success_timestamp_seconds",
                         "Unix time of the last API call that succeeded: a job poll, reserve or result post.",
                         registry=REGISTRY)
spool_files = Gauge("antenna_worker_spool_files", "Result files in the spool on disk, waiting to be replayed "
                    "(left by this process or an earlier one).", registry=REGISTRY)
spool_bytes = Gauge("antenna_worker_spool_bytes", "Bytes of the result files in the spool on disk.", registry=REGISTRY)

plan_value = Gauge("antenna_worker_plan_value", "Current loader plan (knob = tasks_per_reserve, batch_size, "
                   "num_workers, prefetch_factor, pin_memory, download_threads, inference_threads).", ["knob"], registry=REGISTRY)
plan_changes = Counter("antenna_worker_plan_changes_total", "Loader plans built, by source.", ["source"],
                       registry=REGISTRY)
plan_predicted_peak_bytes = Gauge("antenna_worker_plan_predicted_peak_bytes",
                                  "Autotune's predicted peak memory for the current plan.", registry=REGISTRY)
plan_predicted_images_per_second = Gauge("antenna_worker_plan_predicted_images_per_second",
                                         "Autotune's predicted throughput for the current plan.", registry=REGISTRY)

memory_used_bytes = Gauge("antenna_worker_memory_used_bytes",
                          "Process-tree memory the watchdog acts on (PSS, or cgroup usage when owned).",
                          registry=REGISTRY)
memory_rss_bytes = Gauge("antenna_worker_memory_rss_bytes", "Process-tree RSS (over-counts shared pages).",
                         registry=REGISTRY)
memory_limit_bytes = Gauge("antenna_worker_memory_limit_bytes", "Effective memory limit and caps.", ["kind"],
                           registry=REGISTRY)
memory_available_bytes = Gauge("antenna_worker_memory_available_bytes", "MemAvailable of the host.",
                               registry=REGISTRY)
memory_pressure_some_ratio = Gauge("antenna_worker_memory_pressure_some_ratio",
                                   "PSI memory some avg10, as a 0-1 ratio.", registry=REGISTRY)
processes = Gauge("antenna_worker_processes", "Processes in the worker's tree.", registry=REGISTRY)
open_fds = Gauge("antenna_worker_open_fds", "Open file descriptors across the worker's tree.", registry=REGISTRY)
shm_bytes = Gauge("antenna_worker_shm_bytes", "/dev/shm bytes mapped or held by the worker's tree.",
                  registry=REGISTRY)
fetch_limit = Gauge("antenna_worker_fetch_limit", "Governor's current fetch limits (knob = tasks_per_reserve, "
                    "prefetch_depth, admit_reserves).", ["knob"], registry=REGISTRY)
watchdog_actions = Counter("antenna_worker_watchdog_actions_total", "Governor decisions that changed something.",
                           ["action"], registry=REGISTRY)
watchdog_sampler_cpu_seconds = Counter("antenna_worker_watchdog_sampler_cpu_seconds",
                                       "CPU seconds the memory sampler has spent.", registry=REGISTRY)

current_job = Gauge("antenna_worker_current_job_id", "Id of the job being processed (0 when idle).",
                    registry=REGISTRY)
job_images_done = Gauge("antenna_worker_job_images_done", "Images with a result in the current job.",
                        registry=REGISTRY)
job_tasks_queued = Gauge("antenna_worker_job_tasks_queued",
                         "Tasks of the current job still queued on the server when the last processed task "
                         "was delivered (from its reply subject; NaN when unknown).", registry=REGISTRY)
jobs = Counter("antenna_worker_jobs_total", "Jobs entered.", registry=REGISTRY)
state = Gauge("antenna_worker_state", "1 for the worker's current state.", ["state"], registry=REGISTRY)
