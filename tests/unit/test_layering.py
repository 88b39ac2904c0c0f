"""The layers run one way: stages, engines and families never reach up into the HTTP layer or the
export toolchain (DESIGN.md: "Stages never import serve/api/; the runtime never imports export/")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.unit.test_no_ray_outside_deployments import _parse

ROOT = Path(__file__).resolve().parents[2]
LOWER = ("serve/stages", "serve/engines", "serve/families")
FORBIDDEN = ("serve.api", "export")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an import statement names (function-local imports included)."""
    found = []
    for node in ast.walk(_parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def offenders(paths) -> list[str]:
    bad = []
    for path in paths:
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_stages_engines_and_families_never_import_the_api_or_export():
    paths = [p for pkg in LOWER for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(paths) > 10
    assert offenders(paths) == []


def test_the_scan_can_fail(tmp_path):
    global ROOT
    planted = tmp_path / "serve" / "stages" / "bad.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("def f():\n    from export.manifest import read_manifest\n")
    root, ROOT = ROOT, tmp_path
    try:
        assert offenders([planted]) == ["serve/stages/bad.py:2 imports export.manifest"]
    finally:
        ROOT = root


def test_importing_the_runtime_loads_neither_export_nor_onnx():
    """Indirect imports too: serve.engines (every backend module), the stages and the families."""
    code = (
        "import sys\n"
        "import serve.engines, serve.engines.onnxruntime_backend, serve.engines.tensorrt_backend\n"
        "import serve.engines.torch_backend, serve.engines.manifest, serve.families, serve.pipeline\n"
        "import serve.stages.text_encoder, serve.stages.denoiser, serve.stages.decoder, serve.stages.continuous\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('export', 'onnx', 'onnxslim', 'onnxscript'))\n"
        "print(bad[:5]); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
