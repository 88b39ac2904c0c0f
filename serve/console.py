"""What the ``darkroom`` command shows on its terminal: one line per log event, each third-party
warning once, and a missing optional package as one line naming what to install.

Library code only logs (``logging``); this module decides how that looks in the CLI. diffusers
and transformers print through handlers of their own, so the CLI routes them through the root
handler (``route_library_logs``) once they are imported; without that, loading three stages
prints diffusers' multi-line "`accelerate` was not found" warning once per stage.
"""

from __future__ import annotations

import logging
import os
import re
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = ("serve", "export", "deployments", "bench", "darkroom")

# Python package -> how to get it. Packages of the main install are listed too: missing, they
# mean a broken install rather than an extra to add.
_EXTRA_FOR_PACKAGE = {
    "tensorrt": "gpu",
    "onnxruntime_gpu": "gpu",
    "pytest": "test",
    "moto": "test",
    "schemathesis": "test",
    "jsonschema": "test",
}
_MAIN_INSTALL = ("onnx", "onnxruntime", "onnxscript", "onnxslim", "torch", "diffusers", "transformers", "ray")


class OneLineFormatter(logging.Formatter):
    """A record's message on one line (newlines and Markdown fences folded); a traceback, when
    a record carries one, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        line = re.sub(r"\s*\n\s*", " ", line.replace("```", ""))
        return re.sub(r"\s+([.,;])$", r"\1", line.strip())


class OnceFilter(logging.Filter):
    """Lets each distinct third-party warning through once per process (Darkroom's own records
    all pass): the same warning from every stage's model load is one event to a user."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS or record.levelno < logging.WARNING:
            return True
        key = (record.name.split(".")[0], record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def configure_logging(level: str) -> logging.Handler:
    """One stderr handler on the root logger, one line per event, third-party warnings once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    handler.addFilter(OnceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Download/load progress bars of the hub libraries: noise in a log, and nothing downloads here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return handler


def route_library_logs() -> None:
    """Send diffusers' and transformers' records through the root handler (no bars, no own
    handler). For commands that load models (they import both libraries anyway)."""
    import importlib

    for name in ("diffusers", "transformers"):
        try:
            lib_logging = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        lib_logging.disable_default_handler()
        lib_logging.enable_propagation()
        lib_logging.disable_progress_bar()


def missing_package_message(exc: ModuleNotFoundError) -> str:
    """One line for a package that is not installed, naming what to install."""
    package = (exc.name or str(exc)).split(".")[0]
    extra = _EXTRA_FOR_PACKAGE.get(package)
    if extra is not None:
        return f"this needs the Python package '{package}', not installed: pip install -e '.[{extra}]'"
    if package in _MAIN_INSTALL:
        return f"the Python package '{package}' is missing from this environment: reinstall Darkroom (pip install -e .)"
    return f"this needs the Python package '{package}', which is not installed (pip install {package})"
