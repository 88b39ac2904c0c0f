"""Ray belongs in deployments/ only: serve/ and export/ must run without it."""

from __future__ import annotations

import ast
import concurrent.futures
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PURE_PACKAGES = ("serve", "export")


def _parse(source: str, filename: str) -> ast.Module:
    """``ast.parse``; on CPython 3.11's "AST constructor recursion depth mismatch" (gh-106905: the
    thread's depth counter is left corrupted by earlier compiles), parse again in a fresh thread."""
    try:
        return ast.parse(source, filename=filename)
    except SystemError:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(ast.parse, source, filename).result(timeout=60)


def _python_files():
    for pkg in PURE_PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_no_ray_import_statements():
    offenders = []
    for path in _python_files():
        tree = _parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "ray"]
    assert offenders == [], f"ray imported outside deployments/: {offenders}"


def test_importing_every_module_loads_no_ray():
    """Catches indirect imports too (a helper that imports something that imports ray)."""
    modules = []
    for path in _python_files():
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules.append(".".join(parts))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad[:5]); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_the_check_itself_can_fail(tmp_path):
    """Guard against a vacuous scan: the AST check finds a planted import."""
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from ray import serve\n")
    tree = ast.parse(planted.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.split(".")[0] == "ray"]
    assert found
