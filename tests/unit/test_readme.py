"""The README's commands: its blocks parsed once here, for these checks and for the tests
that run them (tests/integration/test_readme_venv.py runs every block in a fresh virtual
environment; tests/integration/test_serve_cli.py the main command and the API examples).

A block the tests cannot run (a GPU, real weights, an S3 bucket) carries an HTML comment just
before it: ``<!-- not run by tests: REASON -->``. CI runs the second set-up command.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_RUN = re.compile(r"<!--\s*not run by tests:\s*(.+?)\s*-->\s*\n\s*$")
MAX_NOT_RUN = 5  # keep the list of blocks no test runs short


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README, in document order."""

    language: str
    code: str
    section: str  # the heading above it
    not_run: str | None  # the reason, when marked "not run by tests"

    def commands(self) -> list[str]:
        """A bash block's commands: one per line, continuation lines joined, comments kept."""
        return [line.strip() for line in self.code.replace("\\\n", " ").splitlines() if line.strip()]


def readme_blocks(text: str | None = None) -> list[Block]:
    text = (ROOT / "README.md").read_text() if text is None else text
    blocks = []
    for match in re.finditer(r"```(\w+)\n(.*?)\n```", text, flags=re.S):
        before = text[: match.start()]
        headings = re.findall(r"^#+ (.+)$", before, flags=re.M)
        marked = NOT_RUN.search(before)
        blocks.append(Block(match[1], match[2], headings[-1] if headings else "", marked[1] if marked else None))
    return blocks


def server_command(command: str) -> bool:
    """Whether a command starts a server that blocks (``darkroom serve``, not ``--check``)."""
    parts = [p.strip() for p in command.split("&&")]
    last = shlex.split(parts[-1].split("#")[0]) if parts[-1] else []
    return last[:2] == ["darkroom", "serve"] and "--check" not in last


def starts_its_own_server(command: str) -> bool:
    """Whether a command starts (and stops) a server itself: ``darkroom bench --serve CONFIG``.
    The README asks to stop a running server first (its in-process phase runs only alone)."""
    last = shlex.split(command.split("&&")[-1].split("#")[0]) if command.strip() else []
    return last[:2] == ["darkroom", "bench"] and "--serve" in last


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


def test_blocks_no_test_runs_are_few_and_say_why():
    blocks = readme_blocks()
    not_run = [b for b in blocks if b.not_run]
    assert 0 < len(not_run) <= MAX_NOT_RUN, [b.not_run for b in not_run]
    assert all(len(b.not_run) > 10 for b in not_run)
    # The main install line is the first block, and it runs.
    assert blocks[0].not_run is None and blocks[0].code == setup_commands()[0]
    assert {b.language for b in blocks} <= {"bash", "python"}


def test_not_run_marker_applies_to_the_next_block_only():
    text = "## A\n<!-- not run by tests: needs a GPU -->\n```bash\nx\n```\n\n```bash\ny\n```\n"
    first, second = readme_blocks(text)
    assert (first.not_run, second.not_run) == ("needs a GPU", None)
    assert first.section == "A" and second.commands() == ["y"]


def test_examples_create_what_they_use_first():
    """A folder a command reads with --model was made by an earlier block (e.g. tiny-model)."""
    made: set[str] = set()
    for block in readme_blocks():
        if block.language != "bash":
            continue
        for command in block.commands():
            args = shlex.split(command.split(" #")[0].replace("&&", " && "))
            for flag, value in zip(args, args[1:], strict=False):
                if flag == "--model" and value.startswith("./"):
                    assert value in made or block.not_run, f"{value} used before a block makes it: {command}"
            if args[:2] == ["darkroom", "tiny-model"]:
                made.add(args[2])
            if "--out" in args:
                made.add(args[args.index("--out") + 1])


def test_server_commands_are_recognised():
    assert server_command("pip install torch==2.13.0 && pip install -e . && darkroom serve")
    assert server_command("darkroom serve --config deployments/configs/local.yaml   # a config")
    assert not server_command("darkroom serve --config x.yaml --check")
    assert not server_command("darkroom bench --url http://127.0.0.1:8000")


def test_commands_that_start_their_own_server_are_recognised():
    assert starts_its_own_server("darkroom bench --serve deployments/configs/colocated.yaml --in-process")
    assert not starts_its_own_server("darkroom bench --url http://127.0.0.1:8000 --out x")
    assert not server_command("darkroom bench --serve x.yaml")
    assert any(starts_its_own_server(c) for b in readme_blocks() for c in b.commands())
