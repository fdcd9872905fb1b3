"""The ``worker`` command: thin. Builds settings, then the object to run, then runs it.

A failure a user can cause is one line on stderr, ``worker: ...``, and an exit code (the README's
table): 0 done, 1 a check or run failed, 2 a bad setting or argument, 3 the API rejected a request
(token, project or job id; for ``run --burst``: the last listing or result post was rejected for the
token, 401/403), 4 the API stayed unreachable, 130 interrupted, 141 stdout closed early.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Optional, Sequence

from worker.settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)

EXIT_BAD_SETTING = 2
EXIT_API_REJECTED = 3
EXIT_API_UNREACHABLE = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a C tool reports `tool | head`


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line naming the fix, exit 2 (argparse prints the whole usage)."""

    def error(self, message: str) -> "NoReturn":
        self.exit(EXIT_BAD_SETTING, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _settings(args: argparse.Namespace) -> Settings:
    """Load settings, configure logging from them, and warn once about each unused AMI_ variable."""
    from worker.logs import configure_logging
    from worker.settings import unused_variable_warnings, variable_names

    given = args.env_file
    args.env_file = given or ".env"  # the default is read only where it exists
    settings = load_settings(env_file=args.env_file)
    configure_logging(settings.log_level, settings.log_format, secrets=[settings.token])
    if given is not None and not os.path.exists(given):
        # Not an error: service files and batch scripts name an env file that may not be used.
        log.warning("--env-file %s does not exist: settings come from the environment only", given)
    for line in unused_variable_warnings(variable_names(args.env_file)):
        log.warning("%s", line)
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)  # first: a bad setting is answered before torch loads (seconds)
    _logging(settings)
    from worker.app import build_worker
    from worker.fleet import fleet_size, run_fleet

    environ = dict(os.environ)
    processes = fleet_size(settings, args.processes, environ)
    if processes > 1:  # a parent of worker processes (worker/fleet.py)
        if args.memray:
            raise SettingsError("--memray records one process: use it with --processes 1")
        return run_fleet(settings, processes, env_file=args.env_file, burst=args.burst, environ=environ)
    worker = build_worker(settings, burst=args.burst, environ=environ)
    worker.install_signal_handlers()
    if args.memray:
        from worker.commands.profile import memray_tracking

        with memray_tracking(args.memray, native=args.memray_native):
            return worker.run()
    return worker.run()


def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    settings = _settings(args)
    _logging(settings)
    from worker.commands.tune import run_tune

    return run_tune(settings, job_id=args.job, images=args.images or [], pipeline=args.pipeline,
                    write_env=Path(args.write_env) if args.write_env else None, out=sys.stdout,
                    probe_tasks=args.probe_tasks, environ=dict(os.environ))


def cmd_register(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings)
    from worker.antenna import AntennaError
    from worker.app import make_client, offered_slugs, pipeline_loader
    from worker.pipelines import select_device

    settings.require_token()
    client = make_client(settings)
    load = pipeline_loader(settings, select_device(settings.device))
    configs = [_pipeline_config(load, slug) for slug in offered_slugs(settings)]
    projects = [args.project] if args.project else [int(p["id"]) for p in client.list_projects()]
    if not projects:  # else nothing is registered and the command still ends well
        print("worker: the token sees no project (GET /projects/ listed none), so nothing was registered: "
              "use a token of a member of the projects, or name one with --project", file=sys.stderr)
        return 1
    exit_code = 0
    for project_id in projects:
        try:
            client.register_pipelines(project_id, settings.antenna_service_name, configs)
        except AntennaError as error:  # refused (400, 413 from a proxy...) or unreachable: say so, go on
            exit_code = exit_code or _api_exit_code(error) or EXIT_API_UNREACHABLE
            text = " ".join(str(error).split())[:400]
            print(f"worker: registering with project {project_id} failed: {text}{_too_large_hint(error, configs)}",
                  file=sys.stderr)
            continue
        print(f"registered {len(configs)} pipelines with project {project_id}: "
              + ", ".join(c["slug"] for c in configs))
    return exit_code


def _too_large_hint(error: Exception, configs: list[dict]) -> str:
    """For a 413: how big the body was and what caps it. The category maps of ADC's wide
    classifiers make registration bodies of megabytes; nginx's default cap is 1 MB."""
    from worker.antenna import AntennaRejected

    if not (isinstance(error, AntennaRejected) and error.status == 413):
        return ""
    import json

    size = len(json.dumps({"pipelines": configs}).encode())
    widest = max(configs, key=lambda c: len(json.dumps(c)), default=None)
    return (f"; the registration body was {size:,} bytes ({widest['slug']!r} the largest): raise the body limit "
            "of the proxy in front of Antenna (nginx: client_max_body_size), or offer fewer pipelines "
            "(AMI_ANTENNA_PIPELINES)") if widest else ""


def _pipeline_config(load, slug: str) -> dict:
    """The registration body of ``slug``; a pipeline that cannot load (an unknown slug, a labels file
    that cannot be fetched or read) is one line naming it."""
    try:
        return load(slug).config()
    except (OSError, RuntimeError, ValueError) as error:
        raise SettingsError(f"AMI_ANTENNA_PIPELINES: pipeline {slug!r} cannot be registered: "
                            f"{str(error).splitlines()[0][:300]}") from None


def cmd_models(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _logging(settings)
    from worker.commands.models import run_fetch, run_list

    action = run_fetch if args.models_command == "fetch" else run_list
    return action(settings, args.pipelines, sys.stdout)


def cmd_serve(args: argparse.Namespace) -> int:
    from worker.testing.antenna_server import add_server_arguments, run_server

    parser = OneLineParser(prog="worker serve-antenna", description="The local Antenna-compatible server.")
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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _probe_tasks(text: str) -> int:
    """As AMI_AUTOTUNE_PROBE_TASKS: a probe holds its tasks while it times them."""
    limit = Settings.model_fields["autotune_probe_tasks"].metadata
    low = next(m.ge for m in limit if hasattr(m, "ge"))
    high = next(m.le for m in limit if hasattr(m, "le"))
    if not text.isdigit() or not low <= int(text) <= high:
        raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}")
    return int(text)


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    return name, value


def version_text() -> str:
    """``antenna-worker X, torch Y, Python Z``: from package metadata, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from worker import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"antenna-worker {__version__}, torch {torch_version}, Python {sys.version.split()[0]}"


SERVE_COMMAND = "serve-antenna"
ENV_FILE_HELP = "dotenv file to read (default .env); before or after the subcommand"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="worker", description="Self-tuning Antenna image-inference worker.")
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--env-file", default=None, help=ENV_FILE_HELP)
    # Each subcommand takes --env-file too; SUPPRESS keeps the global value unless it is given there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env-file", default=argparse.SUPPRESS, help=ENV_FILE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="poll the Antenna API and process jobs until stopped")
    run.add_argument("--burst", action="store_true", help="process every available job, then exit "
                     "(0; 3 when the API rejected the token)")
    run.add_argument("--memray", metavar="OUT.bin", help="record this process's allocations with memray "
                     "(loader workers are separate processes and are not recorded; see docs/benchmarks.md)")
    run.add_argument("--processes", type=_positive_int, metavar="N", help="run N worker processes under one parent "
                     "(default AMI_WORKER_PROCESSES, else one per visible CUDA device, else 1); see docs/deployment.md")
    run.add_argument("--memray-native", action="store_true", help="with --memray: also record native stacks")
    run.set_defaults(func=cmd_run)

    tune = sub.add_parser("tune", parents=[common], help="dry run of autotune: probe a job or sample images, print the plan")
    target = tune.add_mutually_exclusive_group()
    target.add_argument("--job", type=int, help="job id to probe (default: the next job of the configured pipelines)")
    target.add_argument("--images", nargs="+", metavar="DIR|URL", help="sample images: a folder, files or URLs "
                        "(nothing is reserved)")
    tune.add_argument("--pipeline", help="pipeline slug for --images (default: the first offered)")
    tune.add_argument("--probe-tasks", type=_probe_tasks, metavar="N",
                      help="tasks to probe, 1 to 32 (default AMI_AUTOTUNE_PROBE_TASKS)")
    tune.add_argument("--write-env", metavar="FILE", help="also write the recommended env lines to FILE")
    tune.set_defaults(func=cmd_tune)

    register = sub.add_parser("register", parents=[common], help="register this worker's pipelines with Antenna projects")
    register.add_argument("--project", type=int, help="project id (default: every project the token sees)")
    register.set_defaults(func=cmd_register)

    models = sub.add_parser("models", parents=[common], help="ADC's model files: fetch them ahead of a run, or list what is cached")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, text in (("fetch", "download the weights and labels files into AMI_MODELS_DIR and check them"),
                       ("list", "show each file: in the cache, in ADC's torch-hub cache, or missing (exit 1)")):
        action = models_sub.add_parser(name, parents=[common], help=text)
        action.add_argument("--pipelines", nargs="+", metavar="SLUG", help="ADC slugs, space- or comma-separated "
                            "(default: the ADC slugs of AMI_ANTENNA_PIPELINES, else all ten)")
    models.set_defaults(func=cmd_models)

    demo = sub.add_parser("demo", parents=[common], help="generate images, start a local server, run the worker, summarise")
    demo.add_argument("--small", type=int, default=24, help="small (~1.5 MB) images (default 24)")
    demo.add_argument("--large", type=int, default=8, help="large (~24 MB, 4096x3072) images (default 8)")
    demo.add_argument("--data-dir", default=None, help="where generated images are cached")
    demo.add_argument("--env", action="append", type=_env_pair, help="extra AMI_ setting for the worker, NAME=VALUE")
    demo.set_defaults(func=cmd_demo)

    # The local server parses its own arguments: `worker run` never imports the test room.
    serve = sub.add_parser(SERVE_COMMAND, help="run the local Antenna-compatible server "
                           "(`worker serve-antenna --help` lists its options)", add_help=False)
    serve.add_argument("server_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", parents=[common], help="print the effective settings as an env file, grouped by "
                            "where each came from; defaults and the token commented out")
    config.set_defaults(func=cmd_config)

    check = sub.add_parser("check", parents=[common], help="check the API and token (reserve included), device, "
                           "pipelines, spool, metrics port, FD and memory limits, /dev/shm; exit 0 when all pass, 1 otherwise")
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


# Process variables (not AMI_ settings) an env file may carry: read before torch loads, below the
# environment. ``worker tune --write-env`` writes OMP_NUM_THREADS into the file ``--env-file`` reads.
ENV_FILE_PROCESS_VARIABLES = ("OMP_NUM_THREADS",)


def apply_process_defaults() -> None:
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)


def apply_env_file_process_variables(env_file: str) -> None:
    """``ENV_FILE_PROCESS_VARIABLES`` from ``env_file`` into this process's environment where it
    does not set them already (torch reads OMP_NUM_THREADS once, when it loads)."""
    if not os.path.isfile(env_file):
        return
    from dotenv import dotenv_values

    for name, value in dotenv_values(env_file).items():
        if name in ENV_FILE_PROCESS_VARIABLES and value:
            os.environ.setdefault(name, value)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """``serve-antenna`` hands everything after it to the local server's own parser: argparse's
    REMAINDER would stop at the first option (``serve-antenna --port 0``)."""
    if SERVE_COMMAND not in argv:
        return build_parser().parse_args(argv)
    at = argv.index(SERVE_COMMAND)
    args = build_parser().parse_args(argv[:at + 1])
    args.server_args = argv[at + 1:]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    apply_process_defaults()
    args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    apply_env_file_process_variables(getattr(args, "env_file", None) or ".env")
    try:
        return int(args.func(args) or 0)
    except SettingsError as error:
        print(f"worker: {error}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`worker config | head`): nothing more can be written, and the flush at
        # exit must not fail again, so stdout goes to /dev/null from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as error:
        code = _api_exit_code(error)
        if code is None:
            raise
        print(f"worker: {api_error_line(error, args)}", file=sys.stderr)
        return code


def _api_exit_code(error: Exception) -> Optional[int]:
    from worker.antenna import AntennaRejected, AntennaUnavailable

    if isinstance(error, AntennaRejected):
        return EXIT_API_REJECTED
    if isinstance(error, AntennaUnavailable):
        return EXIT_API_UNREACHABLE
    return None


def api_error_line(error: Exception, args: argparse.Namespace) -> str:
    """One line for an API error that ends a command, naming the setting to check."""
    from worker.antenna import AntennaRejected

    text = " ".join(str(error).split())[:300]
    if isinstance(error, AntennaRejected) and error.status in (401, 403):
        return f"the API rejected the token ({text}): check AMI_ANTENNA_API_AUTH_TOKEN"
    if isinstance(error, AntennaRejected):
        return f"the API refused the request ({text}): check the ids given and AMI_ANTENNA_API_BASE_URL"
    return f"the API is unreachable ({text}): check AMI_ANTENNA_API_BASE_URL and the network"


if __name__ == "__main__":
    sys.exit(main())
