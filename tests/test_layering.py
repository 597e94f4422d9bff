"""The import graph: jobs -> pipeline -> model, never upwards, and a CLI that starts without torch.

Every ``import`` statement counts, including those inside functions (a lazy import up the stack
is still a dependency up the stack).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("model", "pipeline", "jobs")  # each may import only from those before it
LOCAL_TOOLING = "embedded"  # the laptop's S3 server, Ray head and demo: nothing installed imports it
MODEL_THIRD_PARTY = {"torch", "numpy", "cv2"}


def imports_of(path: Path) -> set[str]:
    """Top-level package names ``path`` imports anywhere (``from . import`` resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(path.parent.name if node.level else (node.module or "").split(".")[0])
    return found


def graph() -> dict[str, set[str]]:
    return {
        str(path.relative_to(REPO)): imports_of(path)
        for package in (*LAYERS, LOCAL_TOOLING)
        for path in sorted((REPO / package).rglob("*.py"))
    }


def test_no_layer_imports_from_a_layer_above_it_or_from_the_local_tooling():
    violations = []
    for module, imported in graph().items():
        package = module.split("/")[0]
        if package == LOCAL_TOOLING:
            continue
        above = set(LAYERS[LAYERS.index(package) + 1 :]) | {LOCAL_TOOLING}
        violations += [f"{module} imports {name}" for name in sorted(imported & above)]
    assert not violations, violations


def test_model_is_pure_maths():
    local = {*LAYERS, LOCAL_TOOLING}
    for module, imported in graph().items():
        if module.startswith("model/"):
            third_party = {
                name
                for name in imported
                if name and name not in sys.stdlib_module_names and name not in local
            }
            assert third_party <= MODEL_THIRD_PARTY, (
                f"{module} imports {sorted(third_party - MODEL_THIRD_PARTY)}"
            )


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "model" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from pipeline import storage\n    import fsspec\n")
    assert {"pipeline", "fsspec"} <= imports_of(bad)


def test_the_cli_imports_no_torch_ray_or_opencv_until_a_command_needs_them():
    code = (
        "import sys, jobs.cli; from jobs.cli import app; "
        "print(','.join(m for m in ('torch', 'ray', 'cv2', 'numpy', 'PIL', 'fsspec') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
