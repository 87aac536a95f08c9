"""Command-line entry for config-driven tools: ``--config=FILE [--config.a.b=value ...]``.

Kept free of jax imports so that light tools (the pretokenizer) start fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import ml_collections


def cli_main(fn: Callable[[ml_collections.ConfigDict], object], help_text: str) -> None:
    """Run ``fn(config)`` for a ``--config=FILE [--config.a.b=value ...]`` command line.

    A bad override (unknown key, wrong type) or a user error raised by ``fn``
    (``ValueError``, ``FileNotFoundError``) ends the process with one line on
    stderr and exit status 1, never a traceback (``OASST_TRACEBACK=1`` re-raises).
    """
    from absl import app, flags, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    flags.mark_flag_as_required("config")

    def parse(argv: list[str]) -> list[str]:
        _exit_if_missing(_config_path(argv))
        try:
            return flags.FLAGS(argv)
        except AttributeError as e:
            name = str(e).strip("\"'")
            sys.exit(f"error: --config override names an unknown field '{name}'")
        except (flags.Error, KeyError, TypeError, ValueError) as e:
            sys.exit(f"error: bad command line: {e}")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
        try:
            fn(config.value)
        except (ValueError, FileNotFoundError) as e:
            if os.environ.get("OASST_TRACEBACK"):  # developers: see where it came from
                raise
            sys.exit(f"error: {e} (OASST_TRACEBACK=1 shows the traceback)")

    app.run(main, flags_parser=parse)


def _config_path(argv: list[str]) -> str | None:
    """The file of ``--config=FILE`` / ``--config FILE`` (``FILE:arg`` passes ``arg`` on)."""
    for i, arg in enumerate(argv[1:], 1):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            return value.split(":", 1)[0]
    return None


def _exit_if_missing(path: str | None) -> None:
    """config_flags reports a missing config file as a multi-line error on first use."""
    if path and not os.path.isfile(path):
        sys.exit(f"error: config file not found: {path}")
