"""Test session setup: 8 emulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# --------------------------------------------------------------------------- tokenizer

import pytest  # noqa: E402

_SP_WORDS = (
    "the quick brown fox jumps over the lazy dog while a helpful assistant answers every "
    "question about python code , numbers 0123456789 and lists ; def return import class "
    "user system context hello world please explain why how what is this"
).split()


def sp_corpus(lines: int = 400) -> list[str]:
    """A deterministic little corpus: enough for a tiny BPE model in ~0.1 s."""
    import random

    rng = random.Random(0)
    return [
        " ".join(rng.choice(_SP_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(lines)
    ]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """A small SentencePiece BPE model (newline-keeping settings) trained at test time."""
    from oasst_jax.tokenizer import train_sentencepiece

    out = tmp_path_factory.mktemp("sp") / "tiny"
    return train_sentencepiece(iter(sp_corpus()), out, 300)


# --------------------------------------------------------------------------- sample data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The README demo's data: a 1000-piece tokenizer trained on ``tests/data`` and the
    five bundled datasets pretokenized with ``configs/data/sample.py`` (paths made absolute)."""
    from oasst_jax import pretokenize
    from oasst_jax.config import load_config
    from oasst_jax.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("sample")
    tok = train_sentencepiece([os.path.join(REPO, "tests", "data")], root / "tokenizer", 1000)
    cfg = load_config(os.path.join(REPO, "configs", "data", "sample.py"))
    cfg.output_dir = str(root / "data")
    cfg.tokenizer_path = str(tok)
    cfg.num_workers = 1
    for entry in cfg.datasets.values():
        for key in ("path", "input_file_path"):
            if key in entry:
                entry[key] = os.path.join(REPO, entry[key])
    pretokenize.run(cfg)
    return {"data_path": cfg.output_dir, "data_prefix": cfg.filename_prefix, "tokenizer": str(tok)}


# --------------------------------------------------------------------------- tiny model


def tiny_llama(**overrides):
    """The suite's tiny Llama: vocab 200 pads to 256 (padding exercised), GQA 4/2, every
    sharded dimension divisible by 2, fp32, weights large enough (std 0.2) that a wrong
    layout changes the logits visibly."""
    from oasst_jax.model import LlamaConfig

    fields = dict(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        dtype="float32",
        remat_policy="none",
        initializer_range=0.2,
    )
    return LlamaConfig(**{**fields, **overrides})


def tiny_hf_llama(path, *, rope_factor: float = 1.0, dtype=None, max_shard_size=None, **fields):
    """A random tiny GQA ``transformers.LlamaForCausalLM`` (vocab 300, which pads to 384)
    saved as safetensors at ``path``; returns the directory.

    Weights are redrawn at std 0.1 and norm scales around 1: HF inits norms to exactly 1
    and matrices at 0.02, which would hide layout mistakes in near-zero logits and make
    greedy argmax ties likely.
    """
    import torch
    import transformers

    rope = {"rope_type": "linear", "factor": rope_factor} if rope_factor != 1.0 else None
    cfg = transformers.LlamaConfig(
        **{
            "vocab_size": 300,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "rope_scaling": rope,
            **fields,
        }
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return str(path)


def max_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of arrays (same structure)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(x - y))) for x, y in pairs)
