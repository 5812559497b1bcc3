"""House rules that keep the code readable: no import cycles in ``apt/``, and the sampling and export
paths free of the training stack (Lightning, DeepSpeed)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``apt`` modules it imports (at any depth of the file, relative imports resolved).
    Importing a package's submodule counts as importing that submodule, not the package's ``__init__``."""
    files = {_module_name(p): p for p in (ROOT / "apt").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # ``from pkg import submodule`` imports the submodule (the package's __init__ only re-exports)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_apt():
    graph = import_graph()
    assert "apt.methods.apt" in graph and "apt.config" in graph["apt.methods.apt"]  # the graph is real
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_sampling_and_export_import_no_training_stack():
    code = ("import sys; import apt.methods.apt, apt.methods.consistency, apt.methods.flow_matching, apt.methods.streaming, apt.inference, apt.sample, apt.export, apt.streaming; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'deepspeed'}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "LOCAL_RANK", "MASTER_"))} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_scripts_import_only_what_apt_has():
    """Every ``from apt.x import name`` in the scripts outside the package (eval/, experiments/, data/, tests/) names a
    module and a name that exist: a script left behind by a move fails here, not when a user runs it."""
    import importlib

    bad = []
    for path in [*ROOT.glob("eval/*.py"), *ROOT.glob("experiments/*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("tests/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "apt":
                try:
                    module = importlib.import_module(node.module)
                except ModuleNotFoundError as e:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {e}")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not bad, "\n".join(bad)
