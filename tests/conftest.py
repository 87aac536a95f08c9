"""Test session setup: 8 emulated CPU devices and one XLA compilation cache per run, set
before jax is imported anywhere."""

import gc
import importlib.metadata
import os
import shutil
import tempfile
import threading

# The suite's time is XLA:CPU compiling its many small distinct programs, not running them.
# Its older (LLVM IR) fusion emitters without the backend's optimisation passes (LLVM -O0,
# no expensive passes; the HLO passes stay, and the arithmetic: no fast-math either way)
# compile them in under a third of the CPU time (test_train_step.py: 15 s against 53 s),
# and toy shapes run as fast.  (Either alone saves little: the new MLIR emitters' time is
# mostly their own pipeline, and at -O2 the old emitters' IR costs more to optimise.)
# Both go in the environment, so CLI runs and notebook kernels the tests start inherit
# them (a test that sets XLA_FLAGS itself keeps COMPILE_FLAGS);
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 and XLA_FLAGS=--xla_cpu_use_fusion_emitters=true undo them.
# XLA 0.11 has no old emitters, and aborts on a flag it does not know.  One LLVM module per
# program, not split for threads that the 2-3 workers on 2 cores leave no core for: ~9 %
# less CPU per compile (a sharded preference step: 10.6 s against 11.6, median of 4 and 2).
_JAXLIB = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
COMPILE_FLAGS = "--xla_cpu_parallel_codegen_split_count=1" + (
    " --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11) else ""
)
_flags = os.environ.get("XLA_FLAGS", "").split()
for _flag in (*COMPILE_FLAGS.split(), "--xla_force_host_platform_device_count=8"):
    if _flag.split("=")[0] not in " ".join(_flags):  # xdist workers inherit the controller's
        _flags.append(_flag)
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Each lowered op's MLIR location holds its whole Python traceback by default (for
# profilers): building it, and XLA carrying it through every pass, is ~5 % of a test's
# CPU; the innermost frame (what an error names) stays.  Inherited by subprocesses too.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "0")

# Many tests compile the very same programs (the tiny model's train/eval steps in every
# short training run, decoding, the same kernels), in different tests, xdist workers and the
# subprocesses they start (CLI runs, the notebook's kernel): a persistent compilation cache
# shared by all of them compiles each program once per run.  The directory is new for every
# run (made by the process that loads this file first: the xdist controller, or pytest
# itself with -n 0; workers and subprocesses inherit it through the environment) and removed
# after it, so nothing lands in the user's home and no earlier run's executables are read.
# The size limit only turns on jax's file lock, so that one worker never reads an entry
# another is still writing.
_CACHE_ENV = "OASST_JAX_TEST_COMPILATION_CACHE"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="oasst-jax-test-xla-cache-")
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=os.environ[_CACHE_ENV],
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    JAX_COMPILATION_CACHE_MAX_SIZE=str(64 << 30),
)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)


import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# (the environment above already did this, unless a plugin imported jax before this file)
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_compilation_cache_max_size", 64 << 30)
jax.config.update(
    "jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
)


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
    from oasst_jax.cli import pretokenize
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


# --------------------------------------------------------------------------- scheduling

# The longest files first, longest to shortest (summed test durations on 2 cores, 3
# workers), then the rest in their usual order, and xdist told to keep this order (its
# default hands out the files with the most tests first): with --dist=loadfile a long file
# started late is a tail only one worker works through, and the shortest last even out the
# workers' ends.
LONGEST_FIRST = (
    "test_cli_train.py",  # 251 s
    "test_multihost.py",  # 218
    "test_preference.py",  # 211
    "test_attention.py",  # 151
    "test_readme.py",  # 129
    "test_lora.py",  # 96
    "test_cli_sample.py",  # 90
    "test_device_suite.py",  # 82
    "test_cli_plan.py",  # 74
    "test_decode.py",  # 64
    "test_pipeline_parallel.py",  # 59
    "test_model.py",  # 47
    "test_checkpoint.py",  # 36
    "test_hf_peft.py",  # 35
    "test_notebook.py",  # 34
    "test_sequence_parallel.py",  # 33
    "test_data_pipeline.py",  # 27
    "test_cli_pretokenize.py",  # 26
    "test_cli.py",  # 25
    "test_train_step.py",  # 22
    "test_cli_train_samples.py",  # 21
    "test_cli_evaluate.py",  # 18
    "test_hf_tokenizer.py",  # 13
    "test_cli_convert.py",  # 13
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.8
        config.option.loadscopereorder = False


def pytest_collection_finish(session):
    """Python's cyclic GC, tuned for a process that traces thousands of programs: what the
    imports and collection made is frozen out of every later collection, and the youngest
    generation is collected every 50,000 allocations, not 700.  Tracing allocates heavily
    and a worker's heap grows to GBs of long-lived objects (compiled programs, caches),
    which each full collection walked again (tracing ~18 % faster, measured on
    test_train_step.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def pytest_xdist_auto_num_workers(config):
    """``--numprocesses=auto`` (setup.cfg): one worker more than the cores this process may
    use.  A worker often waits (subprocess CLIs, multi-process jobs waiting on each other,
    checkpoint I/O) while XLA compiles in the others (setup.cfg's --maxprocesses caps it).
    Measured on 2 cores: the fast tier takes 167 s with 3 workers and 181 s with 2; the
    whole suite 565-591 s with 2 (1068 CPU s) and 557-583 s with 3 (1144-1153 CPU s:
    contention costs about what the waits fill)."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: rest in order
    if any({"llama2", "sp_models"} & set(item.fixturenames) for item in items):
        threading.Thread(target=_prefetch_llama2, daemon=True).start()


def _prefetch_llama2() -> None:
    """Build Meta's tokenizer into its cache from the start of the session, beside the
    first tests' compiles: a cold cache (a fresh CI machine) otherwise kept the first test
    that needs it, and every worker waiting on its lock, idle for the download and build.
    Its errors are left to the ``llama2`` fixture, which builds again and says why."""
    try:
        llama2_tokenizer.build()
    except Exception:  # noqa: BLE001 -- a head start only; the fixture reports
        pass


# Meta's Llama-2 tokenizer (built from a public sdist, cached outside the repo): `llama2`,
# and `sp_models` (the tiny model, then Meta's) for the tests of upstream's rules
import llama2_tokenizer  # noqa: E402
from llama2_tokenizer import llama2, sp_models  # noqa: E402,F401
