"""Greedy decoding speed: ours (``oasst_jax.decode.generate``) vs transformers'
``generate(do_sample=False)`` on the same random weights.

    .venv/bin/python benchmarks/decode.py [--smoke] [--batches 1,8] [--repeats 5]

The issue's setup by default: a 44.6M-parameter Llama (4 layers, hidden 512, 8 query / 4
kv heads, intermediate 1408, vocab 32000), fp32, prompts of 128 random ids, 128 new
tokens, no stop id.  A random ``LlamaForCausalLM`` (weights redrawn at std 0.1, so greedy
argmax is rarely a near tie) is saved as safetensors and read into our parameter tree
(``oasst_jax.hf.load.load_hf``), so both sides run the same weights.

Prints one JSON line per batch size: for each side ``prefill_ms`` (a whole ``generate``
of 1 new token: prompt through the model, first token chosen), ``generate_ms`` (all new
tokens), ``step_ms`` (``(generate - prefill) / (new_tokens - 1)``) and
``new_tokens_per_s``; ``speedup`` (transformers' time / ours, > 1: ours is faster);
``same_ids`` (both sides generated the same ids) and ``matching_prefix`` (the fewest
leading new ids any row shares; float rounding may flip a near-tie argmax late in a long
generation).  Times are medians of ``--repeats`` rounds after a warm-up round (ours:
compilation excluded), each round timing both sides back to back; ``load_avg_1m`` is the
machine's load when the record was taken.  Both sides use every core (XLA's thread pool,
``torch.get_num_threads()``), or one thread each with ``--threads 1`` (steadier on a
shared machine).  ``--smoke``: toy sizes, batch 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import benchlib  # noqa: F401  (puts the checkout on sys.path)
import numpy as np

FULL = dict(layers=4, hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=32000)
SMOKE = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512)


def hf_model(path: str, size: dict):
    """A random fp32 ``LlamaForCausalLM`` saved at ``path`` (std 0.1 weights, norms ~1)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(path, safe_serialization=True)
    model.eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, as ours
    model.generation_config.pad_token_id = 0
    return model


def ours(params, cfg, prompts: list[list[int]]):
    """``run(n) -> (seconds, ids)`` for ours: ``Generation.seconds`` of an already compiled
    loop (compilation is excluded: the first call of each ``n`` is a warm-up)."""
    from oasst_jax import decode

    def run(n: int):
        g = decode.generate(params, cfg, prompts, decode.SamplingParams(max_new_tokens=n), ())
        return g.seconds, g.ids

    return run


def theirs(model, prompts: list[list[int]]):
    """``run(n) -> (seconds, ids)`` for transformers' greedy ``generate``."""
    import torch

    tokens = torch.tensor(prompts)
    mask = torch.ones_like(tokens)

    def run(n: int):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                tokens, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n
            )
        return time.perf_counter() - start, out[:, tokens.shape[1] :].tolist()

    return run


def interleaved(runs: dict, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """``({side: (prefill s, generate s)}, {side: ids})``: medians over ``repeats`` rounds
    after a warm-up round.  Each round runs every side's prefill and whole generation
    back to back, so a change in the machine's load hits both sides alike (on a shared
    machine, timing one side after the other measured the load as much as the code)."""
    samples = {name: ([], []) for name in runs}
    ids = {}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            prefill, _ = run(1)
            generate, ids[name] = run(new_tokens)
            if round_:
                samples[name][0].append(prefill)
                samples[name][1].append(generate)
    medians = {n: tuple(statistics.median(x) for x in pair) for n, pair in samples.items()}
    return medians, ids


def side(prefill: float, generate: float, batch: int, new_tokens: int) -> dict:
    return {
        "prefill_ms": round(1e3 * prefill, 3),
        "step_ms": round(1e3 * (generate - prefill) / max(new_tokens - 1, 1), 3),
        "generate_ms": round(1e3 * generate, 3),
        "new_tokens_per_s": round(batch * new_tokens / generate, 1),
    }


def matching_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """The fewest leading ids any row of ``a`` shares with its row of ``b``."""
    common = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
        common.append(n)
    return min(common)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes (seconds, for tests)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per number (default 5)")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads of each side (default 0: all cores)"
    )
    args = p.parse_args(argv)
    if args.threads == 1:  # before jax starts: XLA's CPU client reads it once
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    elif args.threads > 1:
        raise SystemExit("error: --threads takes 0 (all cores) or 1")
    size = SMOKE if args.smoke else FULL
    batches = [int(b) for b in (args.batches or ("2" if args.smoke else "1,8")).split(",")]
    prompt_len = args.prompt or (8 if args.smoke else 128)
    new_tokens = args.new_tokens or (4 if args.smoke else 128)
    repeats = args.repeats or (1 if args.smoke else 5)

    import jax
    import torch

    from oasst_jax.hf.load import load_hf

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = hf_model(tmp, size)
        params, cfg, _ = load_hf(tmp, dtype="float32")
    params = jax.device_put(params)  # on the device once, as weights.load_for_inference does
    n_params = sum(p.numel() for p in model.parameters())
    for batch in batches:
        rng = np.random.default_rng(batch)
        prompts = rng.integers(3, size["vocab"], (batch, prompt_len)).tolist()
        times, ids = interleaved(
            {"ours": ours(params, cfg, prompts), "transformers": theirs(model, prompts)},
            new_tokens,
            repeats,
        )
        record = {
            "batch": batch,
            "prompt": prompt_len,
            "new_tokens": new_tokens,
            "params_m": round(n_params / 1e6, 2),
            "dtype": "float32",
            "ours": side(*times["ours"], batch, new_tokens),
            "transformers": side(*times["transformers"], batch, new_tokens),
            "same_ids": ids["ours"] == ids["transformers"],
            "matching_prefix": matching_prefix(ids["ours"], ids["transformers"]),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
        mine, hf = record["ours"], record["transformers"]
        record["speedup"] = {
            k: round(hf[f"{k}_ms"] / mine[f"{k}_ms"], 3) for k in ("prefill", "step", "generate")
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
