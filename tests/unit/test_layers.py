"""The library's shape: layers, no import cycles, no private names across modules, shared names
documented, and a light settings layer (the Snakefile imports it while planning)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "pipeline_lib"


def _modules() -> dict[str, Path]:
    out = {}
    for path in LIB.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from pipeline_lib... import name``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline_lib"):
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def test_layers_contract_holds():
    """`lint-imports` (import-linter) with the contract in pyproject.toml."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (pip install -e '.[dev]')"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_import_cycles():
    graph = grimp.build_graph("pipeline_lib")
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_across_modules():
    bad = [f"{path.relative_to(ROOT)}:{line}: {module}.{name}"
           for path in LIB.rglob("*.py") for module, name, line in _imports(path)
           if name.startswith("_") and name != "__version__"]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_every_shared_function_and_class_is_documented():
    """What one module imports from another is public and says what it is in its docstring."""
    modules = _modules()
    missing = set()
    for path in LIB.rglob("*.py"):
        for module, name, _ in _imports(path):
            if module not in modules:
                continue
            for node in ast.parse(modules[module].read_text()).body:
                is_def = isinstance(node, (ast.FunctionDef, ast.ClassDef))
                if is_def and node.name == name and not ast.get_docstring(node):
                    missing.add(f"{module}.{name}")
    assert not missing, f"shared without a docstring: {sorted(missing)}"


def test_settings_stay_light():
    """The Snakefile imports the settings layer while building the DAG: no torch, scipy,
    transformers or accelerate at import time."""
    code = ("import sys; import pipeline_lib.settings.config, pipeline_lib.settings.methods; "
            "print(sorted(m for m in ('torch', 'scipy', 'transformers', 'accelerate') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad_import", [
    "from pipeline_lib.stages.common import StageError\n",  # train -> stages: upward
    "from pipeline_lib.train.runtime import make_accelerator\n",  # math -> train: upward
])
def test_an_upward_import_breaks_the_contract(tmp_path, bad_import):
    """The contract can fail: a copy of the library with one upward import is refused."""
    copy = tmp_path / "repo"
    shutil.copytree(LIB, copy / "pipeline_lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    target = copy / "pipeline_lib" / ("train/sft.py" if "stages" in bad_import else "math/kl.py")
    target.write_text(target.read_text() + "\n\ndef _f():\n    " + bad_import)
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    env = {"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([exe, "--no-cache"], cwd=copy, capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout.upper(), proc.stdout + proc.stderr
