"""The house's arrows, checked on the source: no import circles, no import from a lower floor up to
a higher one, policy (``autotune``, ``watchdog``) never importing mechanism (``worker``), and the
test room never reached from ``worker run``.

Imports inside ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside
functions do (they run).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "autotune", "watchdog")

# Floors of the worker package, lowest first: a module imports only from its own floor or below.
# Values and the edge to the outside; the data path; the loop's contract and its planning step; the
# loop; what plugs into it and wires it; the operator's commands. ``worker.testing`` stands apart:
# only the commands that serve or demo may import it.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("worker", "worker.schema", "worker.results", "worker.settings", "worker.backoff", "worker.logs",
     "worker.metrics", "worker.stops"),
    ("worker.antenna", "worker.imaging", "worker.loading", "worker.posting", "worker.release", "worker.pipelines"),
    ("worker.ingest", "worker.loader_server", "worker.hooks", "worker.head_start"),
    ("worker.probing",),
    ("worker.planning",),
    ("worker.daemon",),
    ("worker.middleware", "worker.app", "worker.fleet"),
    ("worker.commands", "worker.cli"),
)
TEST_ROOM = "worker.testing"
MAY_IMPORT_TEST_ROOM = ("worker.commands.demo", "worker.cli", TEST_ROOM)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports at run time (resolved to the longest known module name)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(path, known) - {name} for name, path in modules.items()}


def floor_of(module: str) -> int:
    best, best_len = -1, -1
    for index, floor in enumerate(FLOORS):
        for prefix in floor:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "worker.daemon" in graph["worker.app"] and "worker.planning" in graph["worker.daemon"]
    assert "worker.testing.antenna_server" in graph["worker.cli"]  # a lazy import inside a function counts


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_policy_never_imports_mechanism():
    for module, targets in import_graph().items():
        if module.split(".")[0] in ("autotune", "watchdog"):
            assert not {t for t in targets if t.split(".")[0] == "worker"}, module
        if module.split(".")[0] == "autotune":
            assert not {t for t in targets if t.split(".")[0] == "watchdog"}, module
        if module.split(".")[0] == "watchdog":
            assert not {t for t in targets if t.split(".")[0] == "autotune"}, module


def test_every_worker_module_has_a_floor_or_is_the_test_room():
    unplaced = [m for m in import_graph() if m.startswith("worker") and floor_of(m) < 0
                and not m.startswith(TEST_ROOM)]
    assert unplaced == []


def test_no_upward_imports_and_only_the_demo_reaches_the_test_room():
    upward = []
    for module, targets in import_graph().items():
        if not module.startswith("worker"):
            continue
        for target in targets:
            if target.startswith(TEST_ROOM):
                if not module.startswith(MAY_IMPORT_TEST_ROOM):
                    upward.append(f"{module} -> {target} (the test room)")
            elif target.startswith("worker") and not module.startswith(TEST_ROOM) and floor_of(target) > floor_of(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


@pytest.mark.timeout(180)
def test_worker_run_never_imports_the_local_test_server(antenna, tiny_images, tmp_path):
    """Start-up of ``worker run`` (parse, settings, wiring, one burst over an empty server), then
    ``sys.modules``: nothing of ``worker.testing`` was loaded."""
    from tests.conftest import TOKEN

    script = (
        "import sys\n"
        "from worker.cli import main\n"
        "code = main(['run', '--burst'])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('worker.testing'))\n"
        "print('LOADED', loaded)\n"
        "sys.exit(code)\n"
    )
    env = {"AMI_ANTENNA_API_BASE_URL": antenna.base_url, "AMI_ANTENNA_API_AUTH_TOKEN": TOKEN,
           "AMI_USER_DATA_PATH": str(tmp_path / "data"), "AMI_ANTENNA_PIPELINES": "null",
           "AMI_METRICS_ADDR": "", "AMI_ANTENNA_API_DATALOADER_NUM_WORKERS": "0",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=170)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout, done.stdout
