"""The package layers: imports point down only, with no cycles, and the CLI and the task bodies
load only what they need."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "workers")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Every project module ``path`` imports, at any depth (lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from pkg import sub`` depends on the module ``sub``, not on ``pkg``'s __init__
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in modules] or [node.module]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def test_workers_never_import_the_driver():
    """``workers`` is the layer below: nothing in it imports ``orchestrator``."""
    modules = _modules()
    bad = {name: sorted(i for i in _imports(path, modules) if i.startswith("orchestrator"))
           for name, path in modules.items() if name.startswith("workers")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_cycles():
    """The graph of project imports (module-level and lazy alike) has no cycle; a package's
    ``__init__`` counts only for what it imports itself."""
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_cli_help_loads_neither_torch_nor_ray():
    """``raymerge --help`` builds its parser without torch, Ray, omegaconf or the engine."""
    loaded = _loaded_after("import orchestrator.cli as c; c.build_parser()")
    heavy = {"torch", "ray", "omegaconf", "numpy", "orchestrator.engine.job"}
    assert not heavy & loaded


def test_task_bodies_load_no_driver_module():
    """A worker unpickling a task body, a store or an alignment transform never imports the
    driver (``orchestrator``) or Ray."""
    loaded = _loaded_after("import workers.tasks, workers.data_stats, workers.align.transforms, "
                           "workers.dynamic_runtime, workers.io.storage, workers.io.hub")
    assert not {m for m in loaded if m.split(".")[0] in ("orchestrator", "ray")}


def test_methods_are_not_named_outside_their_files():
    """The driver never compares with a method's name: what a method needs (its preparation
    phase, solver, continual update, heads, checks) is a field of its spec (the workers' own
    dynamic runtime names its two kinds)."""
    from workers.merge import METHODS

    found = []
    for name, path in _modules().items():
        if name.startswith("workers"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) \
                        else [side]
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {v.value!r}"
                              for v in values
                              if isinstance(v, ast.Constant) and v.value in METHODS]
    assert not found
