"""The package's structure: no import cycle at module level (imports inside functions count),
``import mlx_knnmoe`` pulls in neither click nor torch, and a build leaves the model as it was."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import mlx_knnmoe
from mlx_knnmoe import build_memory
from mlx_knnmoe.data.examples import Dataset, Example
from tests.tiny_models import tiny_model

PACKAGE = Path(mlx_knnmoe.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (anywhere in its body)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            edges.update(t for t in found if t in modules and t != name)
        graph[name] = edges
    return graph


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    graph = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(
        sys.modules[__name__],
        "import_graph",
        lambda: {**graph, **{str(i): set() for i in range(41)}},
    )
    try:
        test_import_graph_is_acyclic()
    except AssertionError as e:
        assert "import cycle: a -> b -> a" in str(e)
    else:
        raise AssertionError("a two-module cycle went unnoticed")


def test_import_does_not_load_click_or_torch():
    code = "import sys, mlx_knnmoe; print('click' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_build_leaves_the_model_as_it_found_it():
    model = tiny_model("qwen3_moe")
    before = {k: v for k, v in tree_flatten(model.parameters())}
    rows = mx.random.randint(0, 300, (6, 12), key=mx.random.key(0)).tolist()
    data = Dataset("t", "t", "0" * 64, "text", [Example(r, [0] + [1] * 11, "t") for r in rows])
    for eta in (1.0, "auto"):
        build_memory(model, None, data, eta=eta, eta_grid=(0.5, 2.0), progress=False)
        after = dict(tree_flatten(model.parameters()))
        assert after.keys() == before.keys(), eta  # no ".inner" paths: wrappers are gone
        assert all(mx.array_equal(after[k], before[k]).item() for k in before)
        assert not hasattr(model, "_knnmoe_routers")


def test_every_folder_of_modules_is_a_package():
    """setuptools ships only folders with an __init__.py (a missing one drops the commands)."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert all((f / "__init__.py").exists() for f in folders), sorted(
        str(f) for f in folders if not (f / "__init__.py").exists()
    )


def test_test_folders_mirror_the_package_and_are_all_collected():
    tests = Path(__file__).parent
    folders = sorted(p.name for p in tests.iterdir() if (p / "__init__.py").exists())
    assert folders and all((PACKAGE / name / "__init__.py").exists() for name in folders)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    collected = {line.split("/")[1] for line in out.splitlines() if line.startswith("tests/")}
    assert set(folders) <= collected, sorted(set(folders) - collected)


def test_architecture_lists_every_module_and_only_those():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    modules_section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- `([\w/]+\.py)`:", modules_section, flags=re.M))
    present = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert listed == present, {"not listed": present - listed, "gone": listed - present}
