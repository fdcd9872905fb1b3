"""The ``worker`` command: thin. Builds settings, then the object to run, then runs it.

Exit codes: 0 done, 1 a check or run failed, 2 a bad setting or argument (one line on stderr),
3 ``run --burst`` only: the API rejected the token (401/403) on the last listing or result post.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from worker.settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(env_file=args.env_file)


def cmd_run(args: argparse.Namespace) -> int:
    from worker.app import build_worker

    settings = _settings(args)
    _logging(settings)
    worker = build_worker(settings, burst=args.burst, environ=dict(os.environ))
    worker.install_signal_handlers()
    if args.memray:
        from worker.commands.profile import memray_tracking

        with memray_tracking(args.memray, native=args.memray_native):
            return worker.run()
    return worker.run()


def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.commands.tune import run_tune

    settings = _settings(args)
    _logging(settings)
    return run_tune(settings, job_id=args.job, images=args.images or [], pipeline=args.pipeline,
                    write_env=Path(args.write_env) if args.write_env else None, out=sys.stdout,
                    probe_tasks=args.probe_tasks, environ=dict(os.environ))


def cmd_register(args: argparse.Namespace) -> int:
    from worker.app import make_client, offered_slugs, pipeline_loader
    from worker.pipelines import select_device

    settings = _settings(args)
    _logging(settings)
    settings.require_token()
    client = make_client(settings)
    load = pipeline_loader(settings, select_device(settings.device))
    configs = [load(slug).config() for slug in offered_slugs(settings)]
    projects = [args.project] if args.project else [int(p["id"]) for p in client.list_projects()]
    for project_id in projects:
        client.register_pipelines(project_id, settings.antenna_service_name, configs)
        print(f"registered {len(configs)} pipelines with project {project_id}: "
              + ", ".join(c["slug"] for c in configs))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from worker.testing.antenna_server import add_server_arguments, run_server

    parser = argparse.ArgumentParser(prog="worker serve-antenna", description="The local Antenna-compatible server.")
    add_server_arguments(parser)
    server_args = parser.parse_args(args.server_args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    return run_server(server_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.commands.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    return run_demo(small=args.small, large=args.large, data_dir=args.data_dir, extra_env=dict(args.env or []))


def cmd_config(args: argparse.Namespace) -> int:
    from worker.commands.check import print_config

    return print_config(_settings(args), env_file=args.env_file)


def cmd_check(args: argparse.Namespace) -> int:
    from worker.logs import configure_logging
    from worker.commands.check import print_checks

    settings = _settings(args)
    configure_logging("WARNING", settings.log_format, secrets=[settings.token])
    return print_checks(settings)


def _logging(settings: Settings) -> None:
    from worker.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, secrets=[settings.token])


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description="Self-tuning Antenna image-inference worker.")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default .env)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="poll the Antenna API and process jobs until stopped")
    run.add_argument("--burst", action="store_true", help="process every available job, then exit "
                     "(0; 3 when the API rejected the token)")
    run.add_argument("--memray", metavar="OUT.bin", help="record this process's allocations with memray "
                     "(loader workers are separate processes and are not recorded; see docs/benchmarks.md)")
    run.add_argument("--memray-native", action="store_true", help="with --memray: also record native stacks")
    run.set_defaults(func=cmd_run)

    tune = sub.add_parser("tune", help="dry run of autotune: probe a job or sample images, print the plan")
    target = tune.add_mutually_exclusive_group()
    target.add_argument("--job", type=int, help="job id to probe (default: the next job of the configured pipelines)")
    target.add_argument("--images", nargs="+", metavar="DIR|URL", help="sample images: a folder, files or URLs "
                        "(nothing is reserved)")
    tune.add_argument("--pipeline", help="pipeline slug for --images (default: the first offered)")
    tune.add_argument("--probe-tasks", type=int, help="tasks to probe (default AMI_AUTOTUNE_PROBE_TASKS)")
    tune.add_argument("--write-env", metavar="FILE", help="also write the recommended env lines to FILE")
    tune.set_defaults(func=cmd_tune)

    register = sub.add_parser("register", help="register this worker's pipelines with Antenna projects")
    register.add_argument("--project", type=int, help="project id (default: every project the token sees)")
    register.set_defaults(func=cmd_register)

    demo = sub.add_parser("demo", help="generate images, start a local server, run the worker, summarise")
    demo.add_argument("--small", type=int, default=24, help="small (~1.5 MB) images (default 24)")
    demo.add_argument("--large", type=int, default=8, help="large (~24 MB, 4096x3072) images (default 8)")
    demo.add_argument("--data-dir", default=None, help="where generated images are cached")
    demo.add_argument("--env", action="append", type=_env_pair, help="extra AMI_ setting for the worker, NAME=VALUE")
    demo.set_defaults(func=cmd_demo)

    # The local server parses its own arguments: `worker run` never imports the test room.
    serve = sub.add_parser("serve-antenna", help="run the local Antenna-compatible server "
                           "(`worker serve-antenna --help` lists its options)", add_help=False)
    serve.add_argument("server_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="print the effective settings and where each came from")
    config.set_defaults(func=cmd_config)

    check = sub.add_parser("check", help="check API reachability and auth, FD limit, memory limit, /dev/shm; "
                                         "exit 0 when all pass, 1 otherwise")
    check.set_defaults(func=cmd_check)
    return parser


# Process-wide defaults for the libraries torch loads; each reads its setting once, when torch
# loads, so they are set before any command imports torch. An operator's own value wins.
# - OMP_WAIT_POLICY=PASSIVE: OpenMP threads that reach a barrier first sleep instead of spinning.
#   On CPU the main process's intra-op threads share the cores with the loader workers (and often
#   an image server), and a spinning thread burns a core another process needs.
# - THP_MEM_ALLOC_ENABLE=1: torch backs CPU tensors of 2 MiB and more with transparent huge pages
#   (where the kernel allows them on request), so the forward pass's large temporaries fault in
#   2 MiB at a time instead of 4 KiB.
# What each gains on the benchmark's small job is in README.md ("Tuning for large-image workloads").
PROCESS_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}


def apply_process_defaults() -> None:
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    apply_process_defaults()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as error:
        print(f"worker: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
