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
# Maths libraries, and onnx: the exported graph is the network's too. Never storage, Ray or Pillow.
MODEL_THIRD_PARTY = {"torch", "numpy", "cv2", "patchmatch", "onnx"}


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


PRIVATE_WRAPPER = "pipeline/ray_internals.py"  # the one module allowed Ray's private internals
STORAGE_CLIENTS = {"fsspec", "s3fs", "boto3", "botocore", "gcsfs", "adlfs"}


def private_imports_of(path: Path) -> set[str]:
    """Dotted module names ``path`` imports that have a private segment (``ray._private``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        found.update(n for n in names if any(part.startswith("_") for part in n.split(".")[1:]))
    return found


def test_jobs_touch_no_storage_client_and_nothing_imports_private_internals():
    for module, imported in graph().items():
        if module.startswith("jobs/"):
            assert not imported & STORAGE_CLIENTS, f"{module} imports {sorted(imported & STORAGE_CLIENTS)}"
    for path in sorted(
        p for package in (*LAYERS, LOCAL_TOOLING, "bench") for p in (REPO / package).rglob("*.py")
    ):
        module = str(path.relative_to(REPO))
        if module != PRIVATE_WRAPPER:
            assert not private_imports_of(path), f"{module} imports {sorted(private_imports_of(path))}"


def test_the_private_ray_internals_glcic_uses_are_still_where_it_looks():
    """Fails by name when a Ray upgrade moves what ``pipeline/ray_internals.py`` wraps."""
    from ray._private.state import state

    assert callable(state.get_max_resources_from_cluster_config)


def test_no_import_cycle_between_modules():
    """Module-level and lazy imports between glcic's own modules form no cycle."""
    modules = {str(p.relative_to(REPO))[:-3].replace("/", "."): p for package in LAYERS
               for p in (REPO / package).rglob("*.py")}  # fmt: skip
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        edges[name] = {t for t in targets if t in modules and t != name and not t.endswith("__init__")}
        edges[name] -= {name.rsplit(".", 1)[0]}  # a package's own __init__ re-exports
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
