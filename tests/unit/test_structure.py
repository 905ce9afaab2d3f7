"""The shape of the package, checked: no import circle anywhere in asvp_backend/ (every import counts: module
level, under TYPE_CHECKING and inside functions), the job bodies import no other job body, every job kind names
a function that exists, and the API process loads no job body and no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from asvp_backend.jobs.registry import JOB_KINDS

PACKAGE = Path(__file__).resolve().parents[2] / "asvp_backend"
JOB_BODIES = {kind.target.partition(":")[0] for kind in JOB_KINDS.values()}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (a name imported from a package counts as its submodule when
    there is one; importing a submodule also imports its packages)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                resolved = resolve(target) if target.startswith("asvp_backend") else None
                while resolved and resolved != "asvp_backend":
                    if resolved != name and not name.startswith(resolved + "."):
                        graph[name].add(resolved)
                    resolved = resolved.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


def test_a_job_body_imports_no_other_job_body():
    graph = import_graph()
    assert len(JOB_BODIES) >= 5
    for body in JOB_BODIES:
        assert not (graph[body] & (JOB_BODIES - {body})), (body, graph[body] & JOB_BODIES)


def test_every_job_kind_names_a_function():
    for kind in JOB_KINDS.values():
        function = kind.function()
        assert callable(function) and function.__doc__, kind.name


def test_the_api_process_loads_no_job_body_and_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from asvp_backend.bootstrap import build_runtime\n"
        "from asvp_backend.config import Settings\n"
        "from asvp_backend.server.app import create_app\n"
        f"create_app(build_runtime(Settings.from_env({{'MODEL_DIR': {str(tmp_path)!r}}}), start_jobs=False))\n"
        "print(' '.join(sorted(name for name in sys.modules)))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=PACKAGE.parent).stdout.split())
    assert "asvp_backend.server.app" in loaded
    assert not loaded & (JOB_BODIES | {"torch", "timm", "sklearn"})


def test_a_worker_imports_the_job_libraries_before_it_forks():
    """rq forks a work-horse per job: a library the worker did not import is imported again by every job
    (Label Studio's SDK client, which the package imports lazily, cost a targeted sync 0.7 s of its 1.3 s)."""
    code = ("import sys\n"
            "from asvp_backend.jobs.registry import preload\n"
            "assert preload() == []\n"
            "print(' '.join(sorted(sys.modules)))\n")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=PACKAGE.parent).stdout.split())
    assert {"label_studio_sdk.client", "torch", "timm", "sklearn", "asvp_backend.jobs.sync"} <= loaded
