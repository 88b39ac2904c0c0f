"""The README's two set-up commands are true: CI runs the second, and the first makes an image."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_two_setup_commands_and_ci_runs_the_second():
    main, tests = setup_commands()
    assert main.startswith("pip install torch==2.13.0")
    assert tests.startswith("pip install torch==2.13.0")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_main_command_produces_an_image(tmp_path):
    main, _ = setup_commands()
    darkroom = [part for part in main.split("&&") if part.strip().startswith("darkroom ")]
    assert len(darkroom) == 1
    args = shlex.split(darkroom[0])
    out = Path(args[args.index("--output") + 1])
    env = dict(os.environ, DARKROOM_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / out).read_bytes().startswith(b"\x89PNG")
