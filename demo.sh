#!/usr/bin/env bash
# The README's demo: train a small tokenizer on the bundled fixtures, pretokenize
# them with the card's chatml recipe, and train configs/tiny.py on 8 emulated CPU
# devices (checkpoints, tensorboard events and metrics.jsonl under runs/tiny).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

"$PY" -m oasst_jax.tokenizer train --input tests/data --out output/sample/tokenizer.model --vocab-size 1000
"$PY" -m oasst_jax.pretokenize --config=configs/data/sample.py | tail -n 12
rm -rf runs/tiny
"$PY" -m oasst_jax.train --config=configs/tiny.py
echo "checkpoints: $(ls runs/tiny/checkpoints | tr '\n' ' ')| tensorboard: runs/tiny/tb | metrics: runs/tiny/metrics.jsonl"
echo "--- a chat reply from the tiny model (python -m oasst_jax.sample; --chat for a conversation):"
"$PY" -m oasst_jax.sample --ckpt runs/tiny/checkpoints --tokenizer output/sample/tokenizer.model \
  --prompt "Explain what a list is." --max-new-tokens 64 --seed 0
