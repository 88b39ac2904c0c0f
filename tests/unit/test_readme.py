"""The README's two set-up commands: CI runs the second (the first is run by
tests/integration/test_serve_cli.py)."""

from __future__ import annotations

import re
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
