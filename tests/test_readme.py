"""README.md's commands, read out of README.md itself and run as written on tiny inputs,
and the commands of the docs/ pages checked against the commands they name.

A README edit that breaks a command breaks this suite.  The Pipeline table is run row by
row in one scratch directory laid out with the README's own relative paths
(``tokenizer.model``, ``Llama-2-70b-hf``, ``checkpoints/...``, ``runs/...``), so each row
consumes what the row above wrote, as a user's would.  What is substituted, and why:

* placeholders (``DIR``, ``N``, ``CKPT``, ``tok.model``) get tiny values;
* the 70B configs get ``--config.*`` overrides appended (the README's own override syntax)
  that point the dataset paths at ``tests/data`` and shrink the batch, sequence and step count
  to a CPU; the model shape needs none: stage 1 adopts the converted tiny model's shape from
  its checkpoint (``use_checkpoint_args``), as it adopts Llama-2-70B's on a cluster;
* optional ``[--flag]`` groups run once without and once with all of them.

Every command runs as if only ``pip install -e .`` had been done: a ``sitecustomize`` in the
subprocesses refuses to import any installed package that the base requirements in
``setup.cfg`` do not pull in (the test extra's transformers, torch, pytest...), except the
``plan`` extra's libtpu that the TPU-topology row documents.  So a core import hidden behind
an extra fails here, as it would for a newcomer.

The cluster section runs against stand-in ``gcloud``/``sbatch``/``srun``/``scontrol``; its
install line (CUDA wheels) is only parsed.  Every ``python -m oasst_jax.VERB ...`` of the
``docs/`` pages (each run by its module's tests) must name a command that exists, flags its
``--help`` lists, config files that exist and config fields they hold.  The first two
README commands are CI's (``.ci/run`` reads them from README.md); the notebook runs in
``test_notebook.py``.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
import typing

import pytest
from conftest import COMPILE_FLAGS, REPO, tiny_hf_llama

README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
VOCAB = 512  # the tokenizer row's N (the fixtures hold ~450 characters); the tiny HF model matches


def readme_text() -> str:
    with open(README) as f:
        return f.read()


def section(name: str) -> str:
    """The text of one ``## name`` section."""
    text = readme_text()
    start = text.index(f"\n## {name}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def pipeline_rows() -> dict[str, str]:
    """Pipeline table: step (first column) -> the command (first ``python -m`` code span)."""
    rows = {}
    lines = section("Pipeline").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| step |"))
    for line in lines[start + 2 :]:  # the first table only: header and rule skipped
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        commands = [c for c in re.findall(r"`([^`]+)`", cells[1]) if c.startswith("python -m ")]
        assert commands, f"README Pipeline row without a command: {line}"
        rows[cells[0]] = commands[0]
    return rows


def bash_blocks(name: str) -> list[str]:
    """The command lines of the ```bash blocks of a README section (comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section(name), re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def expand_optional(command: str) -> list[str]:
    """``cmd [--a] [--b x]`` -> [``cmd``, ``cmd --a --b x``]."""
    groups = re.findall(r"\s*\[([^\]]+)\]", command)
    bare = re.sub(r"\s*\[[^\]]+\]", "", command)
    return [bare] + ([f"{bare} {' '.join(groups)}"] if groups else [])


def substitute(command: str, values: dict[str, str]) -> str:
    """Replace whole-word placeholders (``DIR``, ``tok.model``...)."""
    for name, value in values.items():
        command = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/-])", value, command)
    return command


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_command_outlives_its_test():
    """A test that failed half-way leaves no row it started running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(
    command: str, cwd, extra: tuple[str, ...] = (), stdin: str | None = None, env=None
) -> tuple[str, subprocess.Popen, typing.IO, typing.IO]:
    """Start a README ``python -m ...`` command (``python`` = this interpreter), its output
    into temporary files (a pipe nobody reads yet would stall it): rows that do not read
    each other's outputs run side by side, and :func:`finish` checks each."""
    argv = shlex.split(command) + list(extra)
    assert argv[0] == "python", command
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, *argv[1:]],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        text=True,
    )
    _STARTED.append(proc)
    if stdin is not None:  # a short line: fits the pipe's buffer, read when the CLI asks
        proc.stdin.write(stdin)
        proc.stdin.close()
    return f"{command} {' '.join(extra)}", proc, out, err


def finish(started: tuple[str, subprocess.Popen, typing.IO, typing.IO]) -> str:
    """Wait for a started command; its stdout, checked (exit 0 within 10 min)."""
    what, proc, out, err = started
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read())
        f.close()
    assert proc.returncode == 0, f"{what}\n{texts[0]}\n{texts[1]}"
    return texts[0]


def run(command: str, cwd, extra: tuple[str, ...] = (), stdin: str | None = None, env=None) -> str:
    """Run a README ``python -m ...`` command, checked."""
    return finish(start(command, cwd, extra, stdin, env))


ALLOWED_EXTRAS = {"libtpu"}  # the plan extra: `plan --topology` is documented to need it


def base_distributions() -> set[str]:
    """Normalised names of the distributions ``pip install -e .`` brings: setup.cfg's
    ``install_requires`` and, transitively, what the installed ones require."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    todo = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        extras = [{"extra": e} for e in req.extras] or [{"extra": ""}]
        for sub in map(Requirement, dist.requires or []):
            if not sub.marker or any(sub.marker.evaluate(e) for e in extras):
                todo.append(sub)
    return seen


def blocked_modules() -> set[str]:
    """Top-level modules that only packages outside the base requirements provide."""
    from packaging.utils import canonicalize_name

    base = base_distributions() | {"oasst-jax"}
    provided: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        provided.setdefault(module, set()).update(canonicalize_name(d) for d in dists)
    return {
        m
        for m, dists in provided.items()
        if not dists & base and m not in ALLOWED_EXTRAS and not m.startswith("_")
    }


@pytest.fixture(scope="module")
def base_only_env(tmp_path_factory) -> dict[str, str]:
    """Environment whose Python cannot import what the base install would not have."""
    site = tmp_path_factory.mktemp("base_only")
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {sorted(blocked_modules())!r}\n"
        "class _Extras:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(\n"
        "                f'No module named {name!r} (not a base dependency)', name=name)\n"
        "sys.meta_path.insert(0, _Extras())\n"
    )
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    # conftest's per-run compilation cache, in a folder of its own: jax compresses entries
    # with zstandard where it can import it, and locks the folder with filelock, neither
    # of which a base install has (so: no size limit, the only thing that needs the lock)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("base_only_xla_cache"))
    env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
    return env


def test_base_only_env_blocks_test_extras(base_only_env):
    """The sandbox itself: base packages import, test-extra ones do not."""
    probe = (
        "import jax, orbax.checkpoint, pyarrow, grain\n"
        "try:\n    import transformers\nexcept ImportError:\n    print('blocked')"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=base_only_env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "blocked", out.stderr


def fixture_path(*parts: str) -> str:
    return os.path.join(REPO, "tests", "data", *parts)


STAGE1_DATA = (
    f"--config.datasets.megacode2.path={fixture_path('megacode2.json')}",
    f"--config.datasets['orca-chat'].path={fixture_path('orca-chat-gpt4.json')}",
    f"--config.datasets.dolly15k_multilingual.path={fixture_path('dolly15k')}",
    f"--config.datasets.oa_leet10k.path={fixture_path('oa_leet10k.parquet')}",
    # the fixtures are ~20 rows a dataset: a val split the card's 1% would leave empty
    *(
        f"--config.datasets{key}.val_split=0.2"
        for key in (".megacode2", "['orca-chat']", ".dolly15k_multilingual", ".oa_leet10k")
    ),
    "--config.num_workers=1",
)
STAGE2_DATA = (
    f"--config.datasets.oasst_export.input_file_path={fixture_path('oasst_ready.tar.gz')}",
    "--config.datasets.oasst_export.val_split=0.2",
    "--config.num_workers=1",
)
# 8 emulated devices in the card's tensor x pipeline shape; a CPU-sized batch and run.
TRAIN_ON_CPU = (
    "--config.mesh.tensor=2",
    "--config.mesh.pipeline=2",
    "--config.seq_length=128",
    "--config.global_batch_size=4",
    "--config.micro_batch_size=1",
    "--config.train_iters=2",
    "--config.eval_interval=2",
    "--config.eval_iters=1",
    "--config.save_interval=2",
    "--config.model.dtype=float32",
    "--config.async_checkpointing=False",
    "--config.eval_max_new_tokens=2",  # the eval-time samples still run, 2 tokens long
)
# The plan rows plan the card's 70B; a CPU compiles a 2-layer Llama of the same config.
PLAN_ON_CPU = (
    "--config.model.num_hidden_layers=4",
    "--config.model.hidden_size=256",
    "--config.model.intermediate_size=512",
    "--config.model.num_attention_heads=8",
    "--config.model.num_key_value_heads=8",
    "--config.model.vocab_size=1024",
    "--config.seq_length=256",
    "--config.global_batch_size=16",
)


@pytest.mark.slow
def test_pipeline_rows_run_as_written(tmp_path, base_only_env):
    """Every row of the README's Pipeline table, in order, in one scratch directory."""
    rows = pipeline_rows()
    done = set()
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(os.path.join(REPO, "configs"), work / "configs")

    def row(prefix: str) -> str:
        (step,) = [s for s in rows if s.startswith(prefix)]
        done.add(step)
        return rows[step]

    # Rows run side by side where neither reads the other's output: the plan rows (configs
    # only) beside the whole chain, the import beside the tokenizer, the two data rows,
    # and the three rows that read the stage-2 checkpoint.
    # the planner sizes its emulated CPU devices itself: no device count from conftest
    plan_env = {**base_only_env, "XLA_FLAGS": COMPILE_FLAGS}
    planning = [start(v, work, PLAN_ON_CPU, env=plan_env) for v in expand_optional(row("plan"))]

    # tokenizer: DIR = the bundled fixtures, written where the later rows read it
    cmd = substitute(
        row("tokenizer"),
        {"DIR": fixture_path(), "tok.model": "tokenizer.model", "N": str(VOCAB)},
    )
    tokenizing = start(cmd, work, env=base_only_env)
    # import: the README's Llama-2-70b-hf is a tiny random HF Llama (8 heads: --tensor 8 below)
    tiny_hf_llama(
        work / "Llama-2-70b-hf",
        vocab_size=VOCAB,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,  # room for sample's default system prompt
    )
    importing = start(row("import"), work, env=base_only_env)
    finish(tokenizing)
    assert (work / "tokenizer.model").is_file()

    data = [
        start(row("stage-1 data"), work, STAGE1_DATA, env=base_only_env),
        start(row("stage-2 data"), work, STAGE2_DATA, env=base_only_env),
    ]
    finish(importing)
    assert (work / "checkpoints" / "llama2-70b-chatml").is_dir()
    for started in data:
        finish(started)
    for split in ("train", "val"):
        assert (work / "output" / "oasst_pre10_min25" / f"oasst_pre10-{split}").is_dir()
        assert (work / "output" / "oasst_top1_2023-07-23" / f"oasst_top1-{split}").is_dir()

    run(row("stage 1"), work, TRAIN_ON_CPU, env=base_only_env)
    assert (work / "runs" / "oasst_pre10_llama2_70b" / "checkpoints" / "2").is_dir()
    run(row("stage 2"), work, TRAIN_ON_CPU, env=base_only_env)
    sft = work / "runs" / "oasst_sft10_llama2_70b"
    assert (sft / "checkpoints" / "2").is_dir()

    (work / "prompts.jsonl").write_text('{"prompt": "Explain what a list is."}\n"Hi"\n')
    report_cmd = substitute(row("sampling report"), {"CKPT": str(sft / "checkpoints")})
    reading = [
        start(row("export"), work, env=base_only_env),
        start(row("chat"), work, ("--max-new-tokens", "4"), "Hello there\n", base_only_env),
        start(report_cmd, work, ("--max-new-tokens", "4"), env=base_only_env),
    ]
    finish(reading[0])
    exported = work / "llama2-70b-oasst-sft10-hf"
    assert (exported / "config.json").is_file() and (exported / "tokenizer.model").is_file()
    assert "assistant>" in finish(reading[1])
    finish(reading[2])
    report = json.loads((work / "report.json").read_text())
    assert len(report["prompts"]) == 2, report

    plans = [json.loads(finish(p).strip().splitlines()[-1]) for p in planning]
    # (scripts rely on the last stdout line being one JSON object)
    assert all(p["peak_bytes_per_device"] > 0 for p in plans), plans
    assert plans[0]["mesh"]["tensor"] == 8 and plans[0]["mesh"]["pipeline"] == 4, plans[0]

    assert done == set(rows), f"Pipeline rows this test does not run: {set(rows) - done}"


def _tool(path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_cluster_commands_against_stand_ins(tmp_path):
    """The cluster section's command lines, verbatim, with stand-in cloud/SLURM tools that
    log what they were asked to run; the install line (CUDA wheels) is only parsed."""
    lines = bash_blocks("Running on a cluster")
    assert lines, "README cluster section has no bash block"
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    _tool(bin_dir / "gcloud", f'echo "gcloud $*" >> {log}\n')
    _tool(bin_dir / "scontrol", 'printf "gpu-node-1\\n"\n')
    _tool(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=0 "$@"\n')
    _tool(bin_dir / "sbatch", 'exec bash "$@"\n')
    # the SLURM script runs from the submit directory's venv; a stand-in python logs too
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    _tool(submit / ".venv" / "bin" / "python", f'echo "python $*" >> {log}\n')
    shared = tmp_path / "shared"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SHARED": str(shared),
        "SLURM_SUBMIT_DIR": str(submit),
        "SLURM_JOB_NODELIST": "gpu-node-1",
        "SLURM_NTASKS": "1",
    }
    ran = 0
    for line in lines:
        subprocess.run(["bash", "-n", "-c", line], check=True)
        if "pip install" in line:
            continue
        log.write_text("")
        proc = subprocess.run(
            ["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        calls = log.read_text()
        stage = re.match(r"STAGE=(\w+)", line).group(1)
        phase = line.split()[-1] if line.split()[-1] in ("data", "train") else "all"
        if phase in ("all", "data"):
            assert "oasst_jax.pretokenize" in calls, (line, calls)
        if phase in ("all", "train"):
            trains = [c for c in calls.splitlines() if "oasst_jax.train" in c]
            assert any(f"--config=configs/{stage}.py" in c for c in trains), (line, calls)
        ran += 1
    assert ran >= 4, lines


def docs_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every ``python -m oasst_jax.VERB ...`` of the docs/ pages,
    in code blocks and code spans (a table cell's escaped ``\\|`` unescaped)."""
    found = []
    for page in sorted(os.listdir(DOCS)):
        text = open(os.path.join(DOCS, page), encoding="utf-8").read()
        blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))
        for snippet in [line for b in blocks for line in b.splitlines()] + spans:
            start = snippet.find("python -m oasst_jax.")
            if start >= 0 and re.match(r"python -m oasst_jax\.[a-z]", snippet[start:]):
                found.append((page, snippet[start:].replace("\\|", "|")))
        for row in (line for line in text.splitlines() if line.startswith("| ")):
            # a table row's later spans of flags (``--config.x=1``, ``--config=other.py``)
            # are what its command takes too: each checked as that command
            command = verb = None
            for span in re.findall(r"`([^`\n]+)`", row):
                if span.startswith("python -m oasst_jax."):
                    command, verb = span, " ".join(span.split()[:3])
                elif command and span.startswith("--config="):
                    command = f"{verb} {span}"
                    found.append((page, command))
                elif command and span.startswith("--"):
                    found.append((page, f"{command} {span}".replace("\\|", "|")))
    return found


def _has_field(cfg, dotted: str) -> bool:
    """Whether ``--config.a.b`` / ``--config.a['b'].c`` names a field of ``cfg``."""
    node = cfg
    for key in re.findall(r"\['([^']+)'\]|([^.\[\]]+)", dotted):
        key = key[0] or key[1]
        if not hasattr(node, "keys") or key not in node.keys():
            return False
        node = node[key]
    return True


@pytest.mark.slow  # one --help process per documented command (~10 s of process starts)
def test_docs_commands_name_real_commands_flags_and_configs():
    """A renamed command, a dropped flag, a moved config file or a config field that no longer
    exists fails here, page and command named."""
    from oasst_jax.config import load_config

    commands = docs_commands()
    assert len(commands) >= 10, commands
    helps: dict[tuple[str, ...], str] = {}
    wanted: list[tuple[str, str, tuple[str, ...], list[str]]] = []
    for page, command in commands:
        for variant in expand_optional(command):
            argv = shlex.split(variant)
            verb = argv[2].removeprefix("oasst_jax.")
            where = f"docs/{page}: {variant}"
            assert os.path.isfile(os.path.join(REPO, "oasst_jax", "cli", f"{verb}.py")), where
            sub = argv[3:4] if argv[3:4] and not argv[3].startswith("-") else []
            if verb not in ("convert", "tokenizer") and sub != ["compare"]:
                sub = []  # a positional argument (plot's run directories), not a subcommand
            options = [a for a in argv[3:] if a.startswith("--")]
            cfg = None
            for option in options:
                name, _, value = option.partition("=")
                if name == "--config":
                    assert os.path.isfile(os.path.join(REPO, value)), where
                    cfg = load_config(os.path.join(REPO, value))
                elif name.startswith("--config."):
                    assert cfg is not None, (where, "an override without --config=FILE")
                    assert _has_field(cfg, name.removeprefix("--config.")), (where, name)
            flags = [o.partition("=")[0] for o in options if not o.startswith("--config")]
            helps[(verb, *sub)] = ""
            wanted.append((where, verb, tuple(sub), flags))
    started = {
        key: start(f"python -m oasst_jax.{' '.join(key)} --help", REPO) for key in helps
    }  # side by side: each is one short process start
    helps = {key: finish(proc) for key, proc in started.items()}
    for where, verb, sub, flags in wanted:
        missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", helps[(verb, *sub)])]
        assert not missing, (where, missing)
