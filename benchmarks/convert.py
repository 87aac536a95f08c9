"""Peak host memory of ``convert hf-to-orbax`` and ``orbax-to-hf`` on a synthetic Llama.

    .venv/bin/python benchmarks/convert.py [--layers 8] [--hidden 2048] [--max-shard-size 1GB]

Writes random fp32 weights (hidden 2048, intermediate 5504, vocab 32000: ~2 GB
at 8 layers) as three safetensors shards, then runs each direction in a fresh
process and prints one JSON line per direction.  ``peak_anon_gib`` (RssAnon,
sampled every 20 ms) is the memory the kernel cannot reclaim; ``ru_maxrss_gib``
also counts mapped file pages (the safetensors sources, the import's memmaps),
which the kernel evicts under pressure.  Goal: ``peak_anon_gib`` flat as
``--layers`` grows (bounded), not proportional to the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

GIB = 2**30


def write_model(hf_dir: str, layers: int, hidden: int) -> int:
    """A random fp32 ``LlamaForCausalLM`` in safetensors shards; returns its bytes."""
    from safetensors.numpy import save_file

    inter, vocab = hidden * 43 // 16, 32000
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "torch_dtype": "float32",
    }
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    def layer(i: int) -> dict[str, np.ndarray]:
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{n}_proj.weight": rand(hidden, hidden) for n in "qkvo"}
        t |= {p + f"mlp.{n}_proj.weight": rand(inter, hidden) for n in ("gate", "up")}
        t[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[p + f"{norm}.weight"] = np.ones(hidden, np.float32)
        return t

    shards = [
        {
            "model.embed_tokens.weight": rand(vocab, hidden),
            "lm_head.weight": rand(vocab, hidden),
            "model.norm.weight": np.ones(hidden, np.float32),
        },
        lambda: {k: v for i in range(layers // 2) for k, v in layer(i).items()},
        lambda: {k: v for i in range(layers // 2, layers) for k, v in layer(i).items()},
    ]
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        tensors = shard() if callable(shard) else shard
        file = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file(tensors, os.path.join(hf_dir, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.nbytes for t in tensors.values())
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _rss_anon_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kib * 1024 / GIB


def measure(direction: str, src: str, dst: str, max_shard_size: str) -> dict:
    """Run one direction in this process; peak RssAnon is sampled by a thread."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from oasst_jax.hf import convert

    peak = [0.0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _rss_anon_gib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    if direction == "hf-to-orbax":
        convert.hf_to_orbax(src, dst)
    else:
        convert.orbax_to_hf(src, dst, max_shard_size=max_shard_size)
    seconds = time.perf_counter() - start
    peak[0] = max(peak[0], _rss_anon_gib())
    return {
        "direction": direction,
        "seconds": round(seconds, 1),
        "peak_anon_gib": round(peak[0], 2),
        "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--max-shard-size", default="1GB", help="export's safetensors shard size")
    p.add_argument("--child", nargs=3, metavar=("DIRECTION", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.max_shard_size)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as root:
        hf, ckpt, out = (os.path.join(root, n) for n in ("hf", "ckpt", "out"))
        os.makedirs(hf)
        nbytes = write_model(hf, args.layers, args.hidden)
        for direction, src, dst in (("hf-to-orbax", hf, ckpt), ("orbax-to-hf", ckpt, out)):
            cmd = [sys.executable, __file__, "--max-shard-size", args.max_shard_size]
            run = subprocess.run(
                [*cmd, "--child", direction, src, dst], capture_output=True, text=True, check=True
            )
            rec = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps({"layers": args.layers, "model_gib": round(nbytes / GIB, 2), **rec}))


if __name__ == "__main__":
    main()
