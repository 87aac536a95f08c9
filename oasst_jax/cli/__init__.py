"""The command-line tools, apart from the library, and their one entry and error format.

Each ``python -m oasst_jax.X`` runs the module ``oasst_jax.cli.X`` (``oasst_jax/X.py`` is a
two-line shim, so the command users type stays short); a command imports the library and
never another command (``tests/test_imports.py``).  This module is the entry they share.

Config-driven tools (train, pretokenize, plan) parse ``--config=FILE [--config.a.b=value
...]`` with absl + ml_collections (:func:`cli_main`); the others parse with
:class:`ArgumentParser`.  Either way the work runs under :func:`run_main`, so every tool
answers ``--help`` in argparse's layout (exit 0) and ends a user error (a bad flag, a
missing or damaged file, a ``ValueError`` such as ``DataError``) with exactly one line
``error: ...`` on stderr and exit status 1; Ctrl-C is one line and exit status 130.
``OASST_TRACEBACK=1`` re-raises instead, for developers.

Kept free of jax imports so that light tools (the pretokenizer) start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import ml_collections

T = TypeVar("T")

# User errors: bad values (DataError is a ValueError) and files the user named (missing,
# unreadable, a directory, a full disk: FileNotFoundError, PermissionError, ... OSError).
USER_ERRORS = (ValueError, OSError)
TRACEBACK_HINT = "(OASST_TRACEBACK=1 shows the traceback)"


def fail(message: str) -> NoReturn:
    """End the process with the one error line, ``error: <message>``, and exit status 1."""
    raise SystemExit(_error_line(message))


def run_main(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, with a user error or Ctrl-C turned into one ``error:`` line on stderr
    (exit status 1, resp. 130).  Anything else is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except KeyboardInterrupt:
        if os.environ.get("OASST_TRACEBACK"):
            raise
        print(_error_line("interrupted"), file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if os.environ.get("OASST_TRACEBACK"):  # developers: see where it came from
            raise
        fail(f"{str(e) or type(e).__name__} {TRACEBACK_HINT}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are the one error line (exit 1, not argparse's two
    lines and exit 2); its subparsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")

    def add_model_arguments(self) -> None:
        """``--ckpt`` and ``--tokenizer`` as the inference commands (sample, evaluate) take
        them: the same model source and the same refusal of a tokenizer that differs."""
        self.add_argument(
            "--ckpt", required=True, help="orbax checkpoint root or Hugging Face directory"
        )
        self.add_argument(
            "--tokenizer",
            help="SentencePiece model (default: CKPT/tokenizer.model; one that tokenizes "
            "differently from it is refused)",
        )


def cli_main(
    fn: Callable[[ml_collections.ConfigDict], object],
    help_text: str,
    *,
    define: Callable[[], None] | None = None,
    lock_config: bool = True,
    description: str | None = None,
) -> None:
    """Run ``fn(config)`` for a ``--config=FILE [--config.a.b=value ...]`` command line.

    Flags a tool adds (``define`` calls ``flags.DEFINE_*``; ``fn`` reads them from
    ``absl.flags.FLAGS``) are parsed and listed by ``--help`` too.  ``description``
    (default: the first paragraph of the tool's docstring that is not a command line)
    heads the help.  A bad flag or override (unknown key, wrong type) or a user error
    raised by ``fn`` ends the process as :func:`run_main` says.
    """
    from absl import app, flags, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, help_text, lock_config=lock_config)
    flags.mark_flag_as_required("config")
    before = set(flags.FLAGS)
    if define:
        define()
    own = [n for n in flags.FLAGS if n not in before and flags.FLAGS[n].name == n]

    def parse(argv: list[str]) -> list[str]:
        if any(arg in ("-h", "--help", "-help", "--helpshort", "-?") for arg in argv[1:]):
            _print_help(["config", *own], description, sys.modules[fn.__module__].__doc__)
            sys.exit(0)
        _exit_if_missing(_config_path(argv))
        try:
            return flags.FLAGS(argv)
        except AttributeError as e:
            fail(f"--config override names an unknown field {_unknown_field(e, argv)}")
        except (flags.Error, KeyError, TypeError, ValueError) as e:
            fail(f"bad command line: {e} (see {_prog()} --help)")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
        run_main(fn, config.value)

    app.run(main, flags_parser=parse)


def _error_line(message: str) -> str:
    """``error: <message>`` on one line (a multi-line message's lines joined)."""
    return "error: " + " ".join(line.strip() for line in message.splitlines() if line.strip())


def _unknown_field(error: AttributeError, argv: list[str]) -> str:
    """``'a.b.name' (Did you mean ...?)`` from ml_collections' ``AttributeError(KeyError(
    "'name'\\nDid you mean ...?"))`` (a nested field's: whose ``str`` is the repr, escaped
    quotes and a literal ``\\n``), dotted as the command line gave it."""
    inner = error.args[0] if error.args else error
    text = str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner)
    name, _, hint = text.partition("\n")
    name = name.strip("\"'")
    for arg in argv:
        key = arg.lstrip("-").partition("=")[0]
        if key.startswith("config.") and key.rsplit(".", 1)[-1] == name:
            name = key.removeprefix("config.")
            break
    return f"'{name}'" + (f" ({' '.join(hint.split())})" if hint.strip() else "")


def _prog() -> str:
    """How the tool was started: ``python -m oasst_jax.train`` or ``python path.py``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"


def _print_help(names: list[str], description: str | None, doc: str | None) -> None:
    """argparse's help layout for absl flags, as the argparse tools print theirs (the
    description: the first prose paragraph of ``doc``, the tool's module docstring)."""
    from absl import flags

    if description is None:
        paragraphs = (doc or "").split("\n\n")
        commands = ("``python", "python ")
        prose = [p for p in paragraphs if p.strip() and not p.strip().startswith(commands)]
        description = " ".join(prose[0].split()) if prose else None
    p = argparse.ArgumentParser(prog=_prog(), description=description)
    for name in names:
        flag = flags.FLAGS[name]
        text = flag.help
        if name == "config":
            p.add_argument("--config", metavar="FILE", required=True, help=text)
            p.add_argument(
                "--config.KEY", metavar="VALUE", help="override one field of it (repeatable)"
            )
        elif flag.boolean:
            p.add_argument(f"--{name}", action="store_true", help=text)
        else:
            if flag.default not in (None, ""):
                text = f"{text} (default: {flag.default})"
            p.add_argument(f"--{name}", metavar=name.upper(), help=text)
    p.print_help()


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
        fail(f"config file not found: {path}")
