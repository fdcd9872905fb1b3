"""Render ``benchmarks/run.py`` results into docs/benchmarks.md (our section only) and a PNG.

The autotune section sits between ``<!-- autotune-benchmark:start -->`` and
``<!-- autotune-benchmark:end -->``; everything else in the file (other people's sections) is
kept as it is. A file without the markers gets the section appended.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

MiB = 1024 * 1024
GiB = 1024 * MiB
START_MARK = "<!-- autotune-benchmark:start -->"
END_MARK = "<!-- autotune-benchmark:end -->"
REGIMES_START = "<!-- ingest-regimes:start -->"
REGIMES_END = "<!-- ingest-regimes:end -->"


def _mib(value: float) -> str:
    return f"{value / MiB:,.0f}"


def _outcome(result) -> str:
    if result.completed:
        return "all done"
    if result.oom_killed:
        return f"**OOM-killed** ({result.results_ok + result.results_error}/{result.images} done)"
    return f"exit {result.exit_code} ({result.results_ok + result.results_error}/{result.images} done)"


def draws_of(entry: dict[str, Any], key: str) -> list:
    """Every completed run of configuration ``key`` (the first pass's and the repeats')."""
    runs = entry.get("draws", {}).get(key) or [r for r in entry["results"] if r.config == key]
    return [r for r in runs if r.completed]


def median_rate(runs: list, attribute: str = "images_per_s") -> float:
    return statistics.median(getattr(r, attribute) for r in runs) if runs else 0.0


def _draws_text(runs: list) -> str:
    if len(runs) < 2:
        return ""
    return f"{median_rate(runs):.2f} ({', '.join(f'{r.images_per_s:.2f}' for r in runs)})"


def _bound_text(runs: list) -> str:
    """How the draws' peaks stand against their plans' bound (every queue full, the figure a plan is
    held to against the budget); empty where no draw recorded one."""
    bounded = [r for r in runs if r.predicted_bound_bytes and r.peak_bytes]
    if not bounded:
        return ""
    over = [r for r in bounded if r.peak_bytes > r.predicted_bound_bytes]
    worst = max(r.peak_bytes / r.predicted_bound_bytes for r in bounded)
    return (f"; above the plan's bound (every queue full) in {len(over)} of {len(bounded)} draws "
            f"(highest peak {worst:.0%} of its bound)")


def workload_table(entry: dict[str, Any]) -> list[str]:
    w = entry["workload"]
    shaping = "" if not w.latency_s else f", {w.latency_s * 1000:.0f} ms latency, {w.bandwidth_bytes_per_s / 1e6:.0f} MB/s per connection"
    lines = [f"#### {w.name}: {w.count} x {w.preset} images{shaping}", "",
             "| config | plan | images/s (first draw) | median images/s (every draw) | steady images/s | peak MiB (PSS+shm) "
             "| peak PSS MiB | predicted MiB | outcome |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in entry["results"]:
        predicted = _mib(r.predicted_peak_bytes) if r.predicted_peak_bytes else ""
        lines.append(f"| ({r.config}) {r.label} | {r.plan} | {r.images_per_s:.2f} | {_draws_text(draws_of(entry, r.config))} | "
                     f"{r.steady_images_per_s:.2f} | {_mib(r.peak_bytes)} | {_mib(r.peak_pss_bytes)} | {predicted} | {_outcome(r)} |")
    if entry["ceiling"]:
        c = entry["ceiling"]
        r = c["result"]
        runs = [x for x in c.get("draws") or [r] if x.completed]
        lines.append(f"| ingest ceiling (null, autotune) | {r.plan} | {r.images_per_s:.2f} | {_draws_text(runs)} | "
                     f"{r.steady_images_per_s:.2f} | {_mib(r.peak_bytes)} | {_mib(r.peak_pss_bytes)} | | {_outcome(r)} |")
    return lines + [""]


def grid_best(entry: dict[str, Any]) -> tuple[Optional[str], list]:
    """(key, runs) of the grid plan with the highest median over its draws; only the plans drawn
    again compete when there were repeats (they were the fastest first draws)."""
    grid = {key: draws_of(entry, key) for key in {r.config for r in entry["results"] if r.config.startswith("d")}}
    grid = {key: runs for key, runs in grid.items() if runs}
    repeated = {key: runs for key, runs in grid.items() if len(runs) > 1}
    pool = repeated or grid
    if not pool:
        return None, []
    key = max(pool, key=lambda k: median_rate(pool[k]))
    return key, pool[key]


def verdicts(entry: dict[str, Any]) -> list[str]:
    auto_runs, hand_runs = draws_of(entry, "c"), draws_of(entry, "b")
    best_key, best_runs = grid_best(entry)
    name = entry["workload"].name
    lines = []
    auto, hand = median_rate(auto_runs), median_rate(hand_runs)
    many = len(auto_runs) > 1
    what = f"median of {len(auto_runs)} draws" if many else "one draw"
    if best_runs:
        best = median_rate(best_runs)
        ratio = auto / best if best else 0.0
        lines.append(f"- {name}: autotune {auto:.2f} images/s ({what}) = {ratio:.2f} x grid best "
                     f"({best_runs[0].plan}, {best:.2f} over {len(best_runs)} draws; its first draw "
                     f"{best_runs[0].images_per_s:.2f}) -> {'PASS' if ratio >= 0.9 else 'MISS'} (>= 0.9); "
                     f"vs hand workaround {hand:.2f} ({len(hand_runs)} draws) -> {'PASS' if auto >= hand else 'MISS'}")
    predicted = [(r.predicted_peak_bytes / r.peak_bytes - 1.0, r) for r in auto_runs if r.predicted_peak_bytes and r.peak_bytes]
    if predicted:
        error = statistics.median(e for e, _ in predicted)
        every = ", ".join(f"{_mib(r.predicted_peak_bytes)}/{_mib(r.peak_bytes)} ({e:+.0%})" for e, r in predicted)
        lines.append(f"- {name}: autotune predicted/measured peak MiB {every}: median {error:+.0%} -> "
                     f"{'PASS' if abs(error) <= 0.15 else 'MISS'} (+-15%){_bound_text(auto_runs)}")
    timed = [r for r in auto_runs if r.job_wall_s]
    if name == "small" and timed:
        share = statistics.median(r.probe_overhead_s / r.job_wall_s for r in timed)
        whole = statistics.median(r.probe_wall_s / r.job_wall_s for r in timed)
        lines.append(f"- {name}: probe overhead " + ", ".join(f"{r.probe_overhead_s:.2f} s of {r.job_wall_s:.1f} s" for r in timed)
                     + f": median {share:.1%} of the job -> {'PASS' if share <= 0.05 else 'MISS'} (<= 5%); the probe's "
                     f"whole wall (median {whole:.1%}) includes processing the probed tasks, which the job needs anyway")
    if entry["ceiling"]:
        c = entry["ceiling"]
        target = 0.6 * c["cores"] * c["single_core_decode_per_s"]
        runs = [r for r in c.get("draws") or [c["result"]] if r.completed]
        whole, steady = median_rate(runs), median_rate(runs, "steady_images_per_s")
        lines.append(f"- {name}: ingest ceiling {whole:.1f} images/s whole job, {steady:.1f} steady (median of "
                     f"{len(runs)}), vs 0.6 x {c['cores']} cores x {c['single_core_decode_per_s']:.1f} decodes/s = {target:.1f} "
                     f"-> whole job {'PASS' if whole >= target else 'MISS'}, steady {'PASS' if steady >= target else 'MISS'}")
    return lines


def oom_lines(results: list, limit_bytes: int) -> list[str]:
    if not results:
        return []
    lines = [f"### Under a real {limit_bytes / GiB:.0f} GiB memory limit (cgroup v1), large workload", "",
             "| config | outcome | results | exit code | cgroup oom_kill | cgroup failcnt | cgroup max usage MiB | peak MiB (PSS+shm) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| ({r.config}) {r.label} | {_outcome(r)} | {r.results_ok + r.results_error}/{r.images} | "
                     f"{r.exit_code} | {r.cgroup.get('oom_kill', '-')} | {r.cgroup.get('failcnt', '-')} | "
                     f"{_mib(r.cgroup.get('max_usage_bytes', 0))} | {_mib(r.peak_bytes)} |")
    return lines + [""]


def memray_lines(memray: Optional[dict]) -> list[str]:
    if not memray:
        return []
    lines = ["### What holds the peak (memray, large workload)", "",
             f"`worker run --burst --memray {memray['file']}` with the forced plan `{memray['plan']}` on "
             f"{memray['images']} large images (num_workers=0, so download, decode and inference all run in the "
             "recorded process). Top allocation sites alive at the high-water mark "
             "(`memray.FileReader(...).get_high_watermark_allocation_records()`, grouped by the innermost "
             "frame in this project):", "",
             "| MiB at peak | allocations | site |", "|---:|---:|---|"]
    for location, size, count in memray["sites"]:
        lines.append(f"| {size / MiB:,.1f} | {count} | `{location}` |")
    return lines + [""]


def plot_large(entry: dict[str, Any], limit_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.8))
    results = {r.config: r for r in entry["results"]}
    best_key, _ = grid_best(entry)
    best = results.get(best_key) if best_key else None
    chosen = [("a", results.get("a")), ("b", results.get("b")), ("c", results.get("c")), ("d", best)]
    for key, r in chosen:
        if r is None or not r.history:
            continue
        xs = [t for t, _ in r.history]
        ys = [v / GiB for _, v in r.history]
        label = f"({key}) {r.label if key != 'd' else 'grid best ' + r.plan}"
        axes.plot(xs, ys, label=label + (" - OOM-killed" if r.oom_killed else ""))
    axes.axhline(limit_bytes / GiB, color="red", linestyle="--", label=f"cgroup limit {limit_bytes / GiB:.0f} GiB")
    axes.set_xlabel("seconds since worker start")
    axes.set_ylabel("process-tree memory, GiB (PSS + shm)")
    axes.set_title(f"large workload ({entry['workload'].count} x 4096x3072 JPEGs): memory over time")
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def section(meta: dict, sections: dict) -> str:
    lines = [START_MARK, "## Autotune benchmark", "",
             "Command (a quiet machine is assumed; see load below):", "", "```", meta["command"], "```", "",
             f"Run {meta['started']} on {meta['cores']} cores; load average before {meta['load_before'][0]:.2f}, "
             f"after {meta['load_after'][0]:.2f}. Every worker ran in its own cgroup v1 memory cgroup limited to "
             f"{meta['limit_bytes'] / GiB:.0f} GiB (autotune plans against that limit: budget = (limit - 1 GiB) x 0.85). "
             f"Memory is the worker's process tree sampled from outside every {meta.get('meter_interval_s', 0.2)} s: PSS of all mappings except "
             "/dev/shm segments, plus each /dev/shm segment once at its size (`benchmarks/meter.py`): plain PSS "
             "(also shown) misses decoded batches queued in shared memory, which a cgroup does charge. images/s is "
             "the server's view: from the worker's first job listing (pipeline loaded, no loader yet) to the last "
             "accepted result (probe, loader start and the job's tail included for every configuration; the loader's "
             "fork server, which imports torch once for all loader workers, starts with the worker); steady images/s starts once 25% of the job has results. The watchdog is off in these runs "
             "so each plan is measured as planned. On CPU, ADC's pin_memory=True cannot pin (no accelerator), so "
             "(a) runs unpinned; its float32 host tensors are reproduced with the benchmark-only "
             "`AMI_BENCHMARK_PLAN_JSON`. (b) is applied to this worker (uint8 tensors, 4 DataLoader workers, "
             "8 download threads). Grid (d): DataLoader workers {1, 2} x batch = tasks per reserve {4, 16} x "
             "download threads {4, 16} x inference threads {1, the CPU count (torch's default)}, prefetch 2. "
             "Plan notation: w workers, b batch, r tasks per reserve, p prefetch, t download threads, i torch "
             "intra-op threads in the main process.", "",
             f"Draws: every configuration runs once; then the hand workaround, autotune and the two grid plans "
             f"fastest on that first draw run again until each has {meta.get('repeats', 1)} draws, in rotating "
             "order, and so does the ingest ceiling. The checks compare medians: runs of one plan differ by 5-10% "
             "on this shared 2-core machine, and the highest of 16 single grid draws overstates its plan's rate. "
             "The grid's best is the repeated grid plan with the highest median. Peaks and plots are the first "
             "draw's.", ""]
    reference = [entry for entry in sections["workloads"] if entry["workload"].pipeline != "null"]
    for entry in reference:
        lines.extend(workload_table(entry))
    lines.extend(["### Done-when checks", ""])
    for entry in reference:
        lines.extend(verdicts(entry))
    lines.append("")
    large = next((e for e in sections["workloads"] if e["workload"].name == "large"), None)
    if large is not None:
        lines.extend(["![memory over time, large workload](benchmarks-large-memory.png)", ""])
    lines.extend(oom_lines(sections["oom"], meta["oom_limit_bytes"]))
    lines.extend(memray_lines(sections["memray"]))
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


def _walks_text(runs: list) -> str:
    """How often the meter walked the page tables, where it recorded that (``benchmarks.meter``)."""
    counted = [r for r in runs if r.meter_samples]
    if not counted:
        return ""
    return (f"; the meter walked the page tables in {sum(r.meter_walks for r in counted)} of its "
            f"{sum(r.meter_samples for r in counted)} samples")


def regimes_section(meta: dict, sections: dict) -> str:
    """Every workload against its decode bound and link bound, and the throughput model's prediction."""
    lines = [REGIMES_START, "## Ingest against the physical bounds", "",
             "Command:", "", "```", meta["command"], "```", "",
             f"Run {meta['started']} on {meta['cores']} cores; load average before {meta['load_before'][0]:.2f}, "
             f"after {meta['load_after'][0]:.2f}. Each workload reports three figures from the same run "
             "(`benchmarks/bounds.py`): the decode bound (cores x the single-core decode rate of its images: each "
             "distinct image decoded once, measured before every draw, the median taken), the "
             "link bound (a plain 64-connection downloader, its own process, pulling every image of the job once "
             "from the same server under the same shaping) and the worker's images/s (autotune; the median of the "
             "draws). A fourth, together: the same downloader decoding each body as it arrives, one process per "
             "core with the 64 connections split between them, all started at once: what download and decode "
             "give at the same time on these cores with no worker around them (the decode bound is measured with "
             "the link idle and the link bound with the decoder idle; here the local image server shares the "
             "worker's cores, as it cannot on a real deployment). `null-*` workloads run the null pipeline (inference costs nothing: the stand-in for a GPU "
             "host), the others the reference pipeline on CPU. images/s: from the worker's first job listing to "
             "its last accepted result; first to last: from the first accepted result to the last (the job rate "
             "as the ingest issue defines it); steady: from 25% of the job on; with close: to the worker's exit. The "
             "model's prediction (the plan line's images/s, a steady-state figure) is compared with the steady "
             "rate; its bound is the plan line's. Jobs of 1,200 small or 240 large tasks serve 200 or 60 distinct "
             "files in turn (a real job runs to thousands of images; the start, some 3 s on a 300 ms link, weighs "
             "on a short one: the steady column shows the rate without it). "
             "Task latency: from a task's reserve to its accepted result, the first draw's. "
             "Predicted MiB: the plan line's expected peak and, in brackets, its bound (every queue full: the "
             "figure the planner holds against the memory budget).",
             "",
             "| workload | decode bound | link bound | together | worker images/s (draws) | / min bound "
             "| / together | first to last | / min bound | steady | with close "
             "| predicted (bound) | predicted / steady | task latency p50 / p99 s | peak MiB | predicted MiB (bound) | plan |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    checks, starts = [], []
    for entry in sections["workloads"]:
        bounds = entry.get("bounds")
        runs = draws_of(entry, "c")
        if not bounds or not runs:
            continue
        w = entry["workload"]
        starts.extend(start_lines(w, runs))
        whole, steady = median_rate(runs), median_rate(runs, "steady_images_per_s")
        close = median_rate(runs, "with_close_images_per_s")
        first_last = median_rate(runs, "first_to_last_images_per_s")
        predicted = statistics.median(r.predicted_images_per_s for r in runs)
        low = min(bounds["decode_per_s"], bounds["link_per_s"])
        first = runs[0]
        together = bounds.get("together_per_s")
        lines.append(
            f"| {w.name} | {bounds['decode_per_s']:.1f} | {bounds['link_per_s']:.1f} | "
            f"{f'{together:.1f}' if together else '-'} | {whole:.2f} "
            f"({', '.join(f'{r.images_per_s:.2f}' for r in runs)}) | {whole / low:.2f} | "
            f"{f'{whole / together:.2f}' if together else '-'} | {first_last:.2f} | "
            f"{first_last / low:.2f} | {steady:.2f} | {close:.2f} | "
            f"{predicted:.2f} ({first.bottleneck}) | {predicted / steady if steady else 0:.2f} | "
            f"{first.task_latency_s.get('p50', 0):.2f} / {first.task_latency_s.get('p99', 0):.2f} | {_mib(first.peak_bytes)} | "
            f"{_mib(first.predicted_peak_bytes)}"
            f"{f' ({_mib(first.predicted_bound_bytes)})' if first.predicted_bound_bytes else ''} | {first.plan} |")
        if w.pipeline == "null":
            checks.append(f"- {w.name}: {whole:.2f} images/s = {whole / low:.2f} x min(decode {bounds['decode_per_s']:.1f}, "
                          f"link {bounds['link_per_s']:.1f}) -> {'PASS' if whole >= 0.75 * low else 'MISS'} (>= 0.75); "
                          f"first to last result {first_last:.2f} = {first_last / low:.2f} x -> "
                          f"{'PASS' if first_last >= 0.75 * low else 'MISS'}")
            if together:
                checks.append(f"- {w.name}: download and decode together (no worker) {together:.1f} images/s = "
                              f"{together / low:.2f} x min(decode, link); the worker {whole / together:.2f} x it "
                              f"(first to last {first_last / together:.2f} x)")
        harness = [r for r in runs if r.harness_cpu_s > 0]
        if harness:
            share = statistics.median(r.harness_share(meta["cores"]) for r in harness)
            checks.append(
                f"- {w.name}: the benchmark process (local server and meter, on the worker's cores) took "
                f"{statistics.median(r.harness_ms_per_image for r in harness):.2f} ms per image, the meter "
                f"{statistics.median(r.meter_ms_per_image for r in harness):.2f} of them: {share:.1%} of "
                f"the cores over the job (median of the draws){_walks_text(harness)}; the bounds were measured "
                f"without it")
        errors = [r.predicted_images_per_s / r.steady_images_per_s - 1 for r in runs if r.steady_images_per_s]
        if errors:
            error = statistics.median(errors)
            checks.append(f"- {w.name}: predicted {predicted:.2f} vs steady {steady:.2f} images/s: median error "
                          f"{error:+.0%} -> {'PASS' if abs(error) <= 0.2 else 'MISS'} (+-20%)")
        peaks = [r.predicted_peak_bytes / r.peak_bytes - 1 for r in runs if r.predicted_peak_bytes and r.peak_bytes]
        if peaks:
            error = statistics.median(peaks)
            over = [r for r in runs if r.peak_bytes > r.predicted_peak_bytes > 0]
            checks.append(f"- {w.name}: predicted/measured peak median {error:+.0%} -> "
                          f"{'PASS' if abs(error) <= 0.15 else 'MISS'} (+-15%); measured above the prediction in "
                          f"{len(over)} of {len(peaks)} draws{_bound_text(runs)}")
    lines.extend(["", "### Checks", "", *checks])
    if starts:
        lines.extend(["", "### Where the start goes", "",
                      "Seconds from the worker's first job listing, from the server's side (the first draw): "
                      "the probe's accepted results, then the next ones: the head start's first batch, handled "
                      "by the main process while the loader's lanes make their first downloads. Beyond steady: the "
                      "job's seconds less its tasks at its steady rate, i.e. what its start and its tail cost "
                      "(median of the draws).", "", *starts])
    lines.extend(["", REGIMES_END])
    return "\n".join(lines) + "\n"


def start_lines(workload, runs: list) -> list[str]:
    """One line: where ``workload``'s start went (``RunResult.events_s``); [] for runs that did
    not record it."""
    first = runs[0]
    events = first.events_s
    if "probe_result" not in events or "lanes_first_result" not in events:
        return []
    beyond = [r.beyond_steady_s for r in runs if r.beyond_steady_s is not None]
    text = (f"- {workload.name}: probe results at {events['probe_result']:.2f} s, the next results (the head "
            f"start's first batch) at {events['lanes_first_result']:.2f} s")
    if beyond:
        job_s = statistics.median(r.job_wall_s for r in runs)
        text += f"; beyond steady {statistics.median(beyond):.2f} s of a {job_s:.2f} s job"
    return [text]


def _replace_marked(text: str, start: str, end: str, new: str) -> str:
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + new.rstrip("\n") + tail
    return text.rstrip("\n") + "\n\n" + new


def write_docs(meta: dict, sections: dict, doc: Path, plot: Path) -> None:
    """The autotune section when reference workloads ran, the regimes section when any bounds were
    measured; each replaces only its own marked part of ``doc``."""
    large = next((e for e in sections["workloads"] if e["workload"].name == "large"), None)
    if large is not None:
        plot_large(large, meta["limit_bytes"], plot)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if any(entry["workload"].pipeline != "null" for entry in sections["workloads"]) or sections["oom"]:
        text = _replace_marked(text, START_MARK, END_MARK, section(meta, sections))
    if any(entry.get("bounds") for entry in sections["workloads"]):
        text = _replace_marked(text, REGIMES_START, REGIMES_END, regimes_section(meta, sections))
    doc.write_text(text)
