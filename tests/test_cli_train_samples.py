"""Eval-time generation samples and W&B logging wired into the train loop
(oasst_jax/cli/train.py): one short end-to-end run of configs/tiny.py."""

import json
import os

import pytest

from oasst_jax.config import load_config
from oasst_jax.decode import eval_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_samples_at_each_evaluation_and_wandb_offline(sample_data, tmp_path, monkeypatch):
    from oasst_jax.cli import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    cfg.data_path, cfg.data_prefix = sample_data["data_path"], sample_data["data_prefix"]
    cfg.tokenizer_path, cfg.workdir = sample_data["tokenizer"], str(tmp_path)
    cfg.seq_length, cfg.train_iters, cfg.eval_interval, cfg.eval_iters = 64, 3, 2, 1
    cfg.log_interval, cfg.save_interval, cfg.eval_max_new_tokens = 1, 0, 4
    cfg.logging.wandb, cfg.logging.wandb_name = True, "samples-test"
    train.run(cfg)
    prompts = eval_prompts(None)
    with open(tmp_path / "samples.jsonl") as f:
        rows = [json.loads(line) for line in f]
    # at the evaluation of step 2 and at the last step, every shipped prompt once
    assert [r["step"] for r in rows] == [2] * len(prompts) + [3] * len(prompts)
    assert [r["prompt"] for r in rows] == prompts * 2
    assert all(isinstance(r["reply"], str) for r in rows)
    with open(tmp_path / "metrics.jsonl") as f:
        metrics = {m["step"]: m for m in map(json.loads, f)}
    assert metrics[2]["time_samples"] > 0 and "time_samples" not in metrics[1]
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and list(runs[0].glob("*.wandb")), os.listdir(tmp_path / "wandb")
