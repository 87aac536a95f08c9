"""The training loop and its CLI (oasst_jax/train.py): end-to-end, evaluation streams,
bit-exact resume, SIGTERM, truncated checkpoints, non-finite guards, finetune, refusals."""

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import max_diff

from oasst_jax import optim, sharding
from oasst_jax.cli.train import run
from oasst_jax.config import load_config
from oasst_jax.model import Llama
from oasst_jax.sft_feed import open_split
from oasst_jax.train_step import StepConfig, build_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the loop


def _tiny_cfg(sample_data, workdir, **overrides) -> ml_collections.ConfigDict:
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    cfg.data_path = sample_data["data_path"]
    cfg.data_prefix = sample_data["data_prefix"]
    cfg.tokenizer_path = sample_data["tokenizer"]
    cfg.workdir = str(workdir)
    cfg.seq_length = 128
    cfg.log_interval = 1
    # one learning-rate schedule whatever the run's length (it is a constant in the step's
    # program): runs of 1 to 40 steps share one compiled step (the persistent cache)
    cfg.optim.lr_decay_iters = 40
    # no eval-time samples: they are test_cli_train_samples.py's subject, and here every
    # evaluation (each step in the resume test) would decode them (~8 CPU s in this file)
    cfg.eval_prompts = ""
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _event_tags(workdir) -> set[str]:
    """Scalar tags in tensorboard event files (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(workdir, "tb", "events.*")):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags


@pytest.fixture(scope="module")
def tiny_run(sample_data, tmp_path_factory):
    """One 40-step run of the tiny config (eval and save at 20 and 40): its logs are
    ``test_tiny_config_trains_and_logs``'s, its checkpoints the start of the finetune and
    refusal tests below (which copy the workdir before writing to it)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    cfg = _tiny_cfg(sample_data, workdir, train_iters=40, eval_interval=20, save_interval=20)
    run(cfg)
    return workdir, cfg


@pytest.mark.slow
def test_tiny_config_trains_and_logs(tiny_run):
    tmp_path, _ = tiny_run
    rows = _metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 40
    # the bundled data is ~20k tokens: 40 steps take the loss from ~ln(1002)=6.9 well down
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5, losses
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    tags = _event_tags(tmp_path)
    for tag in (
        "loss",
        "val_loss",
        "val_ppl",
        "lr",
        "grad_norm",
        "update_norm",
        "tokens_per_s",
        "step_time",
        "mfu",
        "packing_efficiency",
        "time_data_wait",
        "time_checkpoint",
    ):
        assert tag in tags, tag
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]


@pytest.mark.slow
def test_resume_is_bit_exact(sample_data, tmp_path):
    """Training losses and the validation stream (evaluated every step, continuing from
    the checkpoint's ``val_iterator``) of 0->3 + resume->6 equal those of 0->6."""
    kw = dict(train_iters=6, eval_interval=1, eval_iters=1, save_interval=0, hidden_dropout=0.2)
    run(_tiny_cfg(sample_data, tmp_path / "a", **kw))
    first = _tiny_cfg(sample_data, tmp_path / "b", exit_interval=3, **kw)
    run(first)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["3"]
    from oasst_jax.checkpoint import load_json_item

    assert "val_iterator" in load_json_item(str(tmp_path / "b" / "checkpoints"), "meta", 3)
    first.exit_interval = 0
    run(first)
    for key in ("loss", "val_loss"):
        a = [r[key] for r in _metrics(tmp_path / "a")]
        b = [r[key] for r in _metrics(tmp_path / "b")]
        assert a == b and len(a) == 6, key  # identical floats, not just close


def test_eval_continues_and_eval_full_reads_each_sample_once(sample_data, tmp_path):
    """With fixed weights only the data moves the val loss.  Megatron's stream reads new
    global batches at each evaluation, cycles past the end of the split, and its state
    continues it exactly; ``eval_full`` reads every sample once, the same every time."""
    from oasst_jax import chatml
    from oasst_jax.config import accumulation_steps, model_config
    from oasst_jax.data import pipeline
    from oasst_jax.sft_feed import Validation
    from oasst_jax.tokenizer import Tokenizer

    cfg = _tiny_cfg(sample_data, tmp_path, eval_iters=1, loss_normalization="microbatch_mean")
    tok = Tokenizer(cfg.tokenizer_path)

    def mask(roles, tokens):
        return chatml.loss_mask(roles=roles, tokens=tokens, tokenizer=tok, mode=cfg.loss_on)

    accum = accumulation_steps(cfg, jax.device_count())
    step_cfg = StepConfig(accum, cfg.micro_batch_size, cfg.loss_normalization)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    model = Llama(model_config(cfg))
    zero = np.zeros(model.cfg.num_hidden_layers, np.float32)
    source = open_split(cfg, "val")
    with jax.set_mesh(mesh):
        tx, sched = optim.make_optimizer(cfg.optim, 1), optim.schedule(cfg.optim, 1)
        t = build_trainer(model, tx, sched, step_cfg, zero, mesh)
        params = t.init_random(jax.random.key(0))["params"]

        def validation(**kw):
            c = ml_collections.ConfigDict({**cfg.to_dict(), **kw})
            return Validation(c, source, mask, t.eval, mesh, cfg.global_batch_size // accum)

        stream = validation()
        first = stream(params)
        state = json.loads(json.dumps(stream.get_state()))  # as the checkpoint stores it
        later = [stream(params) for _ in range(2)]
        resumed = validation()
        resumed.set_state(state)
        assert [resumed(params) for _ in range(2)] == later
        assert len({m["val_loss"] for m in [first, *later]}) == 3

        full = validation(eval_full=True)
        assert full.get_state() is None
        once, twice = full(params), full(params)
    assert once == twice
    want = sum(
        pipeline.make_example(source[i], cfg.seq_length, mask)["weights"].sum()
        for i in range(len(source))
    )
    assert once["val_loss_tokens"] == want > 0
    assert sum(m["val_loss_tokens"] for m in [first, *later]) > want  # it cycled


@pytest.mark.slow
def test_truncated_checkpoint_falls_back(sample_data, tmp_path):
    cfg = _tiny_cfg(sample_data, tmp_path, train_iters=4, eval_interval=0, save_interval=2)
    run(cfg)
    ckpts = tmp_path / "checkpoints"
    # a save killed mid-write leaves orbax's temporary folder: never taken as a step
    shutil.copytree(ckpts / "4", ckpts / "6.orbax-checkpoint-tmp-123")
    # and a finished step whose files were truncated afterwards is skipped for the older one
    for f in glob.glob(str(ckpts / "4" / "params" / "**" / "*"), recursive=True):
        if os.path.isfile(f):
            open(f, "wb").close()
    cfg.train_iters = 5
    run(cfg)
    steps = [r["step"] for r in _metrics(tmp_path)]
    assert steps == [1, 2, 3, 4, 5]  # resumed from step 2: 3 and 4 logged once, not twice
    left = os.listdir(ckpts)
    assert "2" in left and any(n.startswith("4.unreadable-") for n in left), left  # kept aside
    assert "6.orbax-checkpoint-tmp-123" not in left  # removed at start-up


def _cli(sample_data, workdir, *overrides) -> subprocess.CompletedProcess:
    """``python -m oasst_jax.train`` on the tiny config (stdout and stderr captured)."""
    args = [
        f"--config={REPO}/configs/tiny.py",
        f"--config.data_path={sample_data['data_path']}",
        f"--config.tokenizer_path={sample_data['tokenizer']}",
        f"--config.workdir={workdir}",
        "--config.seq_length=128",
        "--config.eval_interval=0",
        *overrides,
    ]
    cmd = [sys.executable, "-m", "oasst_jax.train", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nonfinite_params_unsaved_and_changed_optimizer_refused(sample_data, tmp_path, monkeypatch):
    """Two refusals on one short run (each run costs a compile): parameters holding NaN/Inf
    are never saved; and the reported case, clipping turned off on resume, which used to
    set every step aside and restart from random weights with exit 0, stops with one line
    and keeps every checkpoint."""
    from oasst_jax.cli import train

    real, calls = train.all_finite, []

    def finite_until_step_3(params):
        calls.append(1)
        return real(params) if len(calls) < 3 else False

    monkeypatch.setattr(train, "all_finite", finite_until_step_3)
    cfg = _tiny_cfg(sample_data, tmp_path, train_iters=3, eval_interval=0, save_interval=1)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(SystemExit) as e:
        run(cfg)
    assert e.value.code == (
        f"error: step 3: the parameters hold NaN/Inf; not saving them (newest checkpoint: "
        f"{ckpts}/2)"
    )
    assert sorted(os.listdir(ckpts)) == ["1", "2"]

    out = _cli(sample_data, tmp_path, "--config.train_iters=4", "--config.optim.clip_grad=0")
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and lines[-1].startswith("error: "), out.stderr[-2000:]
    assert f"{ckpts}/2 does not fit this run: opt_state" in lines[-1]
    assert "optim.clip_grad 1.0 -> 0" in lines[-1]
    assert sorted(os.listdir(ckpts)) == ["1", "2"]  # nothing set aside
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]  # no fresh run began


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_diverged_run_halts_without_saving_nonfinite_steps(sample_data, tmp_path):
    """lr=1e10: NaN losses from step 3 on (the reported run saved checkpoints throughout and
    exited 0).  Five NaN steps in a row end the run (non-zero exit, one line); no save
    happens inside the streak; metrics.jsonl stays strict JSON; every checkpoint written
    holds finite parameters."""
    cfg = _tiny_cfg(sample_data, tmp_path, train_iters=12, eval_interval=0, save_interval=2)
    cfg.optim.lr, cfg.optim.lr_warmup_iters = 1e10, 1
    with pytest.raises(SystemExit) as e:
        run(cfg)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: step ")
    assert "5 step(s) in a row (nonfinite='skip', nonfinite_max_consecutive=5)" in msg
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [_strict_json(line) for line in f]
    bad = [r["step"] for r in rows if r.get("loss_nonfinite")]
    assert len(bad) == 5 and all(r["loss"] is None for r in rows if r.get("loss_nonfinite"))
    assert bad == list(range(bad[0], bad[0] + 5)), bad
    from oasst_jax import checkpoint

    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved and max(saved) < bad[0] and msg.endswith(f"/checkpoints/{max(saved)}")
    for step in saved:
        params = checkpoint.load_weights(str(tmp_path / "checkpoints"), step=step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


def test_split_without_batches_names_it(sample_data, tmp_path, monkeypatch):
    from oasst_jax import sft_feed

    monkeypatch.setattr(sft_feed, "make_iterator", lambda *a, **k: iter(()))
    cfg = _tiny_cfg(sample_data, tmp_path, train_iters=1, eval_interval=0)
    split = os.path.join(sample_data["data_path"], f"{sample_data['data_prefix']}-train")
    with pytest.raises(ValueError, match=f"^{split}: the split yields no batches"):
        run(cfg)


@pytest.mark.slow
def test_finetune_loads_weights_only(sample_data, tmp_path, tiny_run):
    base_dir, base = tiny_run
    ft = _tiny_cfg(
        sample_data,
        tmp_path / "ft",
        train_iters=1,
        eval_interval=0,
        finetune=True,
        load=str(base_dir / "checkpoints"),
        optim=ml_collections.ConfigDict(base.optim.to_dict()),
    )
    ft.optim.lr_warmup_iters = 5  # the first update uses lr 0: weights stay as loaded
    run(ft)
    from oasst_jax import checkpoint

    loaded = checkpoint.load_weights(str(base_dir / "checkpoints"))
    after = checkpoint.load_weights(str(tmp_path / "ft" / "checkpoints"))
    assert max_diff(loaded, after) == 0.0
    assert _metrics(tmp_path / "ft")[0]["step"] == 1 and _metrics(tmp_path / "ft")[0]["lr"] == 0.0


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(sample_data, tmp_path):
    args = [
        sys.executable,
        "-m",
        "oasst_jax.train",
        f"--config={REPO}/configs/tiny.py",
        f"--config.data_path={sample_data['data_path']}",
        f"--config.tokenizer_path={sample_data['tokenizer']}",
        f"--config.workdir={tmp_path}",
        "--config.train_iters=100000",
        "--config.log_interval=1",
        "--config.eval_interval=0",
        # the module run's step program (a persistent-cache hit): its length and schedule
        "--config.seq_length=128",
        "--config.optim.lr_decay_iters=40",
    ]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 2
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    last = _metrics(tmp_path)[-1]["step"]
    assert os.listdir(tmp_path / "checkpoints") == [str(last)]


def test_cli_rejects_unknown_override(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "oasst_jax.train",
            f"--config={REPO}/configs/tiny.py",
            "--config.optim.learning_rate=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "learning_rate" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_resume_into_other_shape_is_refused(tiny_run, tmp_path):
    base_dir, base = tiny_run
    shutil.copytree(base_dir, tmp_path, dirs_exist_ok=True)
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.workdir = str(tmp_path)
    cfg.model.hidden_size = 64
    cfg.train_iters = 41
    with pytest.raises(
        ValueError, match="checkpoint has model.hidden_size=128, the config asks for 64"
    ):
        run(cfg)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]  # nothing set aside


@pytest.mark.slow
def test_finetune_from_hugging_face_directory(sample_data, tmp_path, tiny_run):
    from oasst_jax import checkpoint
    from oasst_jax.hf import convert

    base_dir, base = tiny_run
    convert.orbax_to_hf(str(base_dir / "checkpoints"), str(tmp_path / "hf"), dtype="float32")
    ft = _tiny_cfg(
        sample_data,
        tmp_path / "ft",
        train_iters=1,
        eval_interval=0,
        finetune=True,
        load=str(tmp_path / "hf"),
    )
    ft.optim.lr_warmup_iters = 5  # first update uses lr 0: weights stay as loaded
    run(ft)
    loaded = checkpoint.load_weights(str(base_dir / "checkpoints"))
    after = checkpoint.load_weights(str(tmp_path / "ft" / "checkpoints"))
    vocab = base.model.vocab_size  # HF has no vocab padding: compare the real rows
    for p in (loaded, after):
        p["embedding"], p["lm_head"] = p["embedding"][:vocab], p["lm_head"][:, :vocab]
    assert max_diff(loaded, after) == 0.0
    ft.model.hidden_size = 64
    ft.workdir = str(tmp_path / "ft2")
    with pytest.raises(ValueError, match="model.hidden_size=128, the config asks for 64"):
        run(ft)


# ------------------------------------------------------------------ a full disk


def _mount_tmpfs(path, size: str, remount: bool = False) -> None:
    """A small tmpfs at ``path`` (root only: skipped elsewhere), or resized."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the test needs one")


def _tb_scalar_steps(workdir, tag: str) -> list[int]:
    """The steps of ``tag`` tensorboard shows: event files in order, an event's
    ``SessionLog.START`` at step s (tensorboardX's ``purge_step``) hiding the steps >= s
    written before it, as TensorBoard's event accumulator does."""
    from tensorboardX.proto import event_pb2

    steps: list[int] = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.*"))):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                steps = [s for s in steps if s < ev.step]
            steps += [ev.step for v in ev.summary.value if v.tag == tag]
    return steps


@pytest.mark.slow
def test_full_disk_at_a_save_is_one_line_and_the_restart_resumes(tiny_run, tmp_path, capfd):
    """Resumed from the module run's step 20 on a tmpfs that holds it but not another
    step: the save of the last step (21: one step is all a save needs) fails as one line
    naming it, its partial folder is removed, no background thread prints a traceback; once
    there is space the same run resumes from 20 and finishes, and metrics.jsonl and
    tensorboard hold each step once (step 21 was logged by both starts)."""
    from oasst_jax import cli

    base_dir, base = tiny_run
    work = tmp_path / "disk"
    _mount_tmpfs(work, "256m")
    try:
        shutil.copytree(base_dir, work, dirs_exist_ok=True)
        shutil.rmtree(work / "checkpoints" / "40")  # resume at 20
        step_bytes = sum(p.stat().st_size for p in (base_dir / "checkpoints/40").rglob("*"))
        disk = os.statvfs(work)
        used = (disk.f_blocks - disk.f_bfree) * disk.f_frsize
        _mount_tmpfs(work, str(used + step_bytes // 2), remount=True)
        cfg = ml_collections.ConfigDict(base.to_dict())
        cfg.workdir, cfg.train_iters = str(work), 21
        capfd.readouterr()
        with pytest.raises(SystemExit) as err:
            cli.run_main(run, cfg)
        line, stderr = err.value.code, capfd.readouterr().err
        ckpts = work / "checkpoints"
        assert line.startswith(
            f"error: [Errno 28] No space left on device writing {ckpts}/21; removed the "
            f"partial {ckpts}/21.orbax-checkpoint-tmp"
        ), line
        assert f"newest checkpoint: {ckpts}/20 (the next start resumes there)" in line
        assert "\n" not in line and "Traceback" not in stderr, stderr[-3000:]
        assert sorted(os.listdir(ckpts)) == ["20"]
        _mount_tmpfs(work, "256m", remount=True)  # space is back: the same run resumes
        run(cfg)
        assert sorted(os.listdir(ckpts)) == ["20", "21"]
        assert [m["step"] for m in _metrics(work)] == list(range(1, 22))
        assert _tb_scalar_steps(work, "loss") == list(range(1, 22))
    finally:
        subprocess.run(["umount", "-l", str(work)], capture_output=True)
