"""Where one benchmark job's time and memory go: its start, step by step, and its peak by process.

    python benchmarks/job_timeline.py null-large-far                  # autotune, the workload's pipeline
    python benchmarks/job_timeline.py slow --draws 3                  # three draws of the reference one
    python benchmarks/job_timeline.py null-small-far --plan '{"num_workers": 2, "batch_size": 16, ...}'
    python benchmarks/job_timeline.py null-small-far AMI_SOME_SETTING=value

Each draw is one ``benchmarks.run.run_one`` job (local server with the workload's shaping, a cgroup
of ``--limit-gib``, the whole-tree meter). It prints:

- the rates the benchmark reports (from the first listing, first to last result, steady);
- the start from the server's side, in seconds from the worker's first job listing: the probe's
  reserve and accepted results, the second reserve and the next results (the head start's, or
  with ``AMI_AUTOTUNE_HEAD_START_TASKS=0`` the first loader lane's and the lanes' first batch);
  then half the job and the last result;
- ``beyond steady``: the job's seconds less what its tasks take at its steady rate, i.e. what the
  start and the tail cost the job;
- the tree's peak sample by process (non-shm PSS of main, fork server, loader workers, tracker,
  plus every /dev/shm segment once) beside the plan's memory terms and its bound.

Nothing is written: it is a look at one job, not a benchmark result. Needs root for the cgroup, as
``run.py`` (without, the limit is the worker's own setting).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchmarks.run as bench  # noqa: E402
from worker.testing.synthetic import default_cache_dir, generate_preset  # noqa: E402

EVENTS = (("probe_reserve", "probe reserve"), ("probe_result", "probe results"),
          ("lanes_first_reserve", "second reserve"), ("lanes_first_result", "next results"),
          ("half", "half the job"), ("last", "last result"))


def harness_text(result: bench.RunResult, cores: int) -> str:
    """What the benchmark process (the local server and the meter) took of the job's CPU."""
    return (f"harness (this process: local server and meter) {result.harness_ms_per_image:.2f} ms per "
            f"image, the meter {result.meter_ms_per_image:.2f} of them: {result.harness_share(cores):.1%} "
            f"of the {cores} cores over the job; the meter walked the page tables in {result.meter_walks} of its "
            f"{result.meter_samples} samples")


def describe(result: bench.RunResult) -> list[str]:
    """The printed lines for one draw."""
    mib = bench.MiB
    lines = [f"{result.plan or result.label}: {result.images_per_s:.2f} images/s, first to last "
             f"{result.first_to_last_images_per_s:.2f}, steady {result.steady_images_per_s:.2f}, "
             f"predicted {result.predicted_images_per_s:.2f} ({result.bottleneck or '-'}); "
             f"job {result.job_wall_s:.2f} s"]
    steps = [f"{label} {result.events_s[name]:.2f}" for name, label in EVENTS if name in result.events_s]
    lines.append("  start (s from the first listing): " + ", ".join(steps))
    beyond_s = result.beyond_steady_s
    if beyond_s is not None:
        lines.append(f"  beyond steady: {beyond_s:.2f} s of {result.job_wall_s:.2f} "
                     f"({result.images} tasks at {result.steady_images_per_s:.2f} images/s would take "
                     f"{result.images / result.steady_images_per_s:.2f} s)")
    if result.harness_cpu_s > 0:
        lines.append(f"  {harness_text(result, bench.cores())}")
    peak = ", ".join(f"{role} {size / mib:.0f}" for role, size in sorted(result.peak_by_role_bytes.items()))
    lines.append(f"  peak {result.peak_bytes / mib:.0f} MiB: {peak}")
    terms = ", ".join(f"{name.removesuffix('_bytes')} {size / mib:.0f}"
                      for name, size in result.plan_memory_bytes.items()
                      if name not in ("total_bytes", "bound_bytes") and size)
    if terms:
        lines.append(f"  plan {result.predicted_peak_bytes / mib:.0f} MiB (bound "
                     f"{result.predicted_bound_bytes / mib:.0f}): {terms}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=[w.name for w in bench.WORKLOADS])
    parser.add_argument("env", nargs="*", metavar="NAME=VALUE", help="worker settings for every draw")
    parser.add_argument("--plan", default="", help="a forced plan as JSON (LoaderPlan fields); default autotune")
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--limit-gib", type=float, default=8.0)
    args = parser.parse_args(argv)
    try:
        env = dict(item.split("=", 1) for item in args.env)
    except ValueError:
        parser.error("settings are NAME=VALUE")
    workload = next(w for w in bench.WORKLOADS if w.name == args.workload)
    images = generate_preset(default_cache_dir(), workload.preset, workload.count, seed=0)
    config = bench.spec_config("timeline", json.loads(args.plan) if args.plan else {}, env, workload.pipeline)
    for draw in range(args.draws):
        result = bench.run_one(workload, images, config, int(args.limit_gib * bench.GiB), tag=f"timeline{draw}-")
        if not result.completed:
            print(f"draw {draw + 1}: incomplete (exit {result.exit_code}, {result.lost} lost)")
        print("\n".join(describe(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
