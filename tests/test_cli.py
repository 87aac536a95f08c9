"""Every ``python -m oasst_jax.X`` tool: ``--help`` exits 0 in argparse's layout, and a bad
input ends with exactly one ``error:`` line on stderr and exit status 1 (oasst_jax.cli).

The bad inputs are cheap ones, refused before anything is compiled."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from oasst_jax import cli

CLIS = ["train", "pretokenize", "plan", "sample", "convert", "tokenizer"]


def _bad_inputs(tmp: str) -> list[tuple[list[str], str]]:
    """(command line, text the one error line holds): a user error raised by each tool's
    work (run_main), and usage errors of both parsers (absl's, argparse's)."""
    missing = os.path.join(tmp, "missing")
    return [
        (["train", "--config=configs/tiny.py", "--config.seq_length=0"], "seq_length=0"),
        (
            ["pretokenize", "--config=configs/data/sample.py", f"--config.tokenizer_path={missing}"]
            + [f"--config.output_dir={tmp}/out"],
            f"tokenizer model not found: {missing}",
        ),
        (["pretokenize", f"--config={missing}.py"], f"config file not found: {missing}.py"),
        (
            ["pretokenize", "--config=configs/data/sample.py"]
            + ["--config.datasets.oasst_export.valsplit=0.1"],
            "unknown field 'datasets.oasst_export.valsplit' (Did you mean \"val_split\"",
        ),
        (["plan", "--config=configs/tiny.py", "--mesh", "tensor=x"], "bad --mesh item"),
        (["plan", "--config=configs/tiny.py", "--bogus"], "Unknown command line flag 'bogus'"),
        (["sample", "--ckpt", missing, "--chat", "--json"], "--chat and --json are alternatives"),
        (["sample", "--prompt", "hi"], "the following arguments are required: --ckpt"),
        (["convert", "hf-to-orbax", "--hf-dir", missing, "--out", f"{tmp}/c"], "no config.json"),
        (["tokenizer", "train", "--input", missing, "--out", f"{tmp}/t"], "no such file"),
        (["tokenizer", "train", "--input", "x", "--out", "y", "--vocab-size", "z"], "invalid int"),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every command line of this file, started at once (each mostly waits on imports)."""
    tmp = str(tmp_path_factory.mktemp("cli"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("OASST_TRACEBACK", None)
    argvs = [[name, "--help"] for name in CLIS] + [argv for argv, _ in _bad_inputs(tmp)]
    procs = {}
    for name, *rest in argvs:
        cmd = [sys.executable, "-m", f"oasst_jax.{name}", *rest]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[(name, *rest)] = subprocess.Popen(cmd, cwd=REPO, env=env, **pipes)
    out = {argv: (p, *p.communicate(timeout=300)) for argv, p in procs.items()}
    return {"tmp": tmp, "out": out}


@pytest.mark.slow  # the module fixture starts 17 CLI processes (~20 s on 2 loaded cores)
@pytest.mark.parametrize("name", CLIS)
def test_help_exits_0_in_one_layout(name, runs):
    proc, stdout, stderr = runs["out"][(name, "--help")]
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.startswith(f"usage: python -m oasst_jax.{name} [-h]"), stdout
    assert "\noptions:\n  -h, --help" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(_bad_inputs("T"))))
def test_bad_input_is_one_error_line(case, runs):
    argv, expected = _bad_inputs(runs["tmp"])[case]
    proc, _, stderr = runs["out"][tuple(argv)]
    assert proc.returncode == 1, stderr[-2000:]
    (line,) = stderr.strip().splitlines() or [""]
    assert line.startswith("error: ") and expected in line, line


@pytest.mark.slow
def test_bad_inputs_write_nothing(runs):
    assert os.listdir(runs["tmp"]) == []


# ----------------------------------------------------------------------- run_main in-process


def _raise(e: BaseException):
    raise e


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("bad\n  value"), "error: bad value"),
        (FileNotFoundError(2, "No such file or directory", "x.json"), "error: [Errno 2] No such"),
        (PermissionError(13, "Permission denied", "/root/x"), "error: [Errno 13] Permission"),
        (IsADirectoryError(21, "Is a directory", "d"), "error: [Errno 21] Is a directory"),
        (OSError(), "error: OSError"),
    ],
)
def test_run_main_user_error_is_one_line(error, line, monkeypatch):
    monkeypatch.delenv("OASST_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run_main(_raise, error)
    assert e.value.code.startswith(line) and "\n" not in e.value.code
    assert e.value.code.endswith(cli.TRACEBACK_HINT)


def test_run_main_interrupt_and_traceback(monkeypatch, capsys):
    monkeypatch.delenv("OASST_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.run_main(_raise, KeyboardInterrupt())
    assert e.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
    with pytest.raises(RuntimeError):  # a bug, not a user error: the traceback stays
        cli.run_main(_raise, RuntimeError("bug"))
    assert cli.run_main(lambda a, b: a + b, 2, 3) == 5
    monkeypatch.setenv("OASST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad"):
        cli.run_main(_raise, ValueError("bad"))
