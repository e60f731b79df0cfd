"""braid's packages are layered — core < rewards < workers < orchestrator — and a module
imports only from its own layer and the ones below, at module level or inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "rewards": 1, "workers": 2, "orchestrator": 3}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]


def test_no_package_imports_one_above_its_layer():
    wrong = []
    for pkg, layer in LAYERS.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, top in _imports(path):
                if LAYERS.get(top, -1) > layer:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from orchestrator.config import Recipe\n")
    assert [top for _, top in _imports(bad)] == ["orchestrator"]
