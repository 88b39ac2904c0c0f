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


def documented_commands() -> list[list[str]]:
    """Every ``darkroom ...`` command in the README's and docs' code blocks (continuations joined)."""
    import shlex

    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    commands = []
    for text in texts:
        for block in re.findall(r"```bash\n(.+?)\n```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    part = part.split("#")[0].strip()
                    if part.startswith("darkroom "):
                        commands.append(shlex.split(part)[1:])
    return commands


def test_every_documented_command_parses():
    """Flags in the docs exist: a renamed flag fails here, not in a user's terminal."""
    from serve.cli import build_parser

    commands = documented_commands()
    assert len(commands) >= 8
    for args in commands:
        parsed = build_parser().parse_args(args)
        assert callable(parsed.func), args
