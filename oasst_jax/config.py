"""Training config: defaults, loading with dotted overrides, start-up validation.

``configs/*.py`` files start from :func:`base_config` and change what the model
card changes, so a reader can diff them against the card.  Field names follow
Megatron-LLM's arguments (docs/training.md has the flag -> field table).  Everything is
validated once at start-up and reported as one line naming the field and value.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from oasst_jax import distributed, sharding
from oasst_jax.model import LlamaConfig
from oasst_jax.turns import LOSS_MODES

# The normalisations ``loss.loss_sum_and_count`` implements (``loss_normalization``).
LOSS_NORMALIZATIONS: tuple[str, ...] = ("global_token_mean", "microbatch_mean")
OBJECTIVES: tuple[str, ...] = ("sft", "rm", "dpo")
DPO_REFERENCES: tuple[str, ...] = ("on_the_fly", "precomputed")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"  # checkpoints/, tb/ and metrics.jsonl live here
    c.seed = 1234
    c.model = ml_collections.ConfigDict()  # filled from configs/model/*.py
    c.use_checkpoint_args = False  # take the model shape from the loaded checkpoint
    # data
    c.data_path = ""  # a pretokenizer output_dir
    c.data_prefix = ""  # its filename_prefix ({prefix}-train, {prefix}-val)
    # "": the tokenizer the train split's metadata records (path and id layout), when that
    # file is still there unchanged; set: this one, and shards of another are refused
    c.tokenizer_path = ""
    c.megatron_new_tokens = False  # with tokenizer_path: Megatron-LLM's 32007-id layout
    c.packing = True  # False = one right-padded sample per row (Megatron-exact)
    c.loss_on = "assistant_turn"  # or "assistant_answer"
    c.loss_normalization = "global_token_mean"  # or "microbatch_mean" (Megatron-exact)
    c.num_packing_bins = 16
    c.data_threads = 2
    # batch
    c.seq_length = 4096
    c.global_batch_size = 64
    c.micro_batch_size = 2
    # schedule / loop (flat: scripts rely on these names)
    c.train_iters = 1000
    c.log_interval = 10
    c.save_interval = 500
    c.eval_interval = 50  # 0 (or eval_iters=0): no evaluation
    c.eval_iters = 10  # global batches per evaluation, from a stream that continues (Megatron)
    c.eval_full = False  # True: every val sample once, from the start, at each evaluation
    c.exit_interval = 0
    # eval-time generation samples (samples.jsonl, tensorboard, W&B): "default" = the set
    # shipped in oasst_jax/resources, a JSONL path = those prompts, "" or None = off
    c.eval_prompts = "default"
    c.eval_max_new_tokens = 64
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    # regularisation
    c.hidden_dropout = 0.0
    c.attention_dropout = 0.0
    c.lima_dropout = False
    # optimizer
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-5,
            min_lr=1e-6,
            lr_warmup_iters=100,
            lr_decay_iters=0,  # 0 = train_iters
            lr_decay_style="cosine",
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-12,
            weight_decay=1e-6,
            clip_grad=1.0,
        )
    )
    # LoRA / QLoRA (oasst_jax/lora.py): rank 0 = off (full fine-tuning).  With rank > 0 the
    # base (`load`, else a random init) is frozen in base_dtype (bfloat16 | int8 | nf4;
    # float32 for exactness tests) and only adapters on `targets` (PEFT's names for Llama's
    # linear layers, comma-separated) are trained; checkpoints hold the adapters alone.
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=0,
            alpha=16.0,
            dropout=0.0,
            targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
            base_dtype="bfloat16",
        )
    )
    # what is trained: "sft" (next-token loss), "rm" (reward model: score head on the last
    # token, upstream's K-wise ranking loss) or "dpo" (sigmoid DPO against the load= policy);
    # rm/dpo read ranked shards (configs/data/oasst_rm.py, oasst_jax/data/ranked_batches.py)
    c.objective = "sft"
    # rm/dpo batches: sequence slots and groups (prompts / pairs) per micro-batch, prefix cap
    c.preference = ml_collections.ConfigDict(
        dict(max_sequences=16, max_groups=8, max_prefix_length=0)  # 0: seq_length // 2
    )
    c.rm = ml_collections.ConfigDict(dict(beta=0.001, max_replies=5))
    # reference: "on_the_fly" (the load= weights kept frozen beside the policy; a LoRA run
    # uses its base) or "precomputed" (a pre-pass writes reference_logps.json to the
    # workdir once, keyed by (example, pair, reply); no reference model during training)
    c.dpo = ml_collections.ConfigDict(
        dict(beta=0.1, reference="on_the_fly", pairs="best_vs_rest", max_pairs_per_prompt=4)
    )
    # Weights & Biases beside tensorboard (oasst_jax/metrics.py; WANDB_MODE=offline works)
    c.logging = ml_collections.ConfigDict(
        dict(wandb=False, wandb_project="oasst_jax", wandb_entity="", wandb_name="")
    )
    c.nonfinite = "skip"  # or "halt"
    c.nonfinite_max_consecutive = 5  # "skip" stops the run after this many NaN/Inf steps in a row
    # checkpoints in
    c.load = ""  # orbax checkpoint dir or HF directory to start from
    c.finetune = False  # True: load weights only (fresh optimizer, step 0, fresh data)
    # hardware
    c.mesh = ml_collections.ConfigDict(dict(sharding.DEFAULT_MESH))  # axis -> size, -1: the rest
    c.peak_flops_per_device = 989e12  # H100 SXM dense bf16
    # multi-process: mode auto|cluster|off, coordinator_address, num_processes, process_id
    # (oasst_jax/distributed.py; docs/training.md, "The mesh")
    c.distributed = distributed.config()
    return c


LLAMA2_DEFAULTS = dict(
    vocab_size=32002,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rope_scaling_factor=1.0,
    rms_norm_eps=1e-5,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="selective",
    attention_impl="xla",
)


def llama2_model(**fields) -> ml_collections.ConfigDict:
    """A ``configs/model/*.py`` body: Llama-2's shared constants (vocab 32000 + the two
    chatml ids, 4096 positions, RoPE theta 10000, RMSNorm eps 1e-5, bf16 compute over
    fp32 master weights, selective remat) overridden by the fields that differ."""
    return ml_collections.ConfigDict({**LLAMA2_DEFAULTS, **fields})


def load_config(path: str) -> ml_collections.ConfigDict:
    """Import a ``get_config()`` file (what ``config_flags`` does, usable from tests)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("_oasst_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_config(cfg: ml_collections.ConfigDict) -> LlamaConfig:
    fields = dict(cfg.model)
    fields["attention_dropout"] = cfg.attention_dropout
    if cfg.lora.rank:
        lora = cfg.lora
        fields.update(
            lora_rank=lora.rank,
            lora_alpha=float(lora.alpha),
            lora_dropout=float(lora.dropout),
            lora_targets=",".join(t.strip() for t in str(lora.targets).split(",") if t.strip()),
            lora_base_dtype=lora.base_dtype,
        )
    return LlamaConfig.from_mapping(fields)


def data_parallel_size(cfg: ml_collections.ConfigDict, num_devices: int) -> int:
    return sharding.axis_size(sharding.resolve_mesh(cfg.mesh, num_devices), "batch")


def accumulation_steps(cfg: ml_collections.ConfigDict, num_devices: int) -> int:
    """``global_batch / (micro_batch * data-parallel size)`` micro-steps per update."""
    dp = data_parallel_size(cfg, num_devices)
    return micro_steps(cfg.global_batch_size, cfg.micro_batch_size, dp)


def micro_steps(global_batch_size: int, micro_batch_size: int, data_parallel: int) -> int:
    """Micro-steps per update, when ``global_batch_size`` splits into whole micro-batches."""
    per_step = micro_batch_size * data_parallel
    if global_batch_size % per_step:
        raise ValueError(
            f"config: global_batch_size={global_batch_size} is not divisible by "
            f"micro_batch_size={micro_batch_size} x data-parallel size {data_parallel}"
        )
    return global_batch_size // per_step


def unknown_fields(cfg, reference, prefix: str = "") -> list[str]:
    """Dotted names in ``cfg`` that ``reference`` lacks, at every level where ``reference``
    has fields (``model`` is empty in :func:`base_config`; LlamaConfig checks its own)."""
    out = []
    for key in cfg.keys():
        if key not in reference:
            out.append(f"{prefix}{key}")
            continue
        sub = reference[key]
        if isinstance(sub, ml_collections.ConfigDict) and len(sub) and hasattr(cfg[key], "keys"):
            out += unknown_fields(cfg[key], sub, f"{prefix}{key}.")
    return out


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """Check everything that can be checked before touching data or devices."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"config: {msg}")

    unknown = unknown_fields(cfg, base_config())
    if unknown:
        raise ValueError(f"config: unknown field {unknown[0]!r} (not in base_config(); a typo?)")

    for name in ("train_iters", "seq_length", "global_batch_size", "micro_batch_size"):
        need(cfg[name] > 0, f"{name}={cfg[name]} must be > 0")
    for name in ("log_interval", "save_interval", "eval_interval", "eval_iters", "exit_interval"):
        need(cfg[name] >= 0, f"{name}={cfg[name]} must be >= 0")
    need(0.0 <= cfg.hidden_dropout < 1.0, f"hidden_dropout={cfg.hidden_dropout} not in [0, 1)")
    need(
        0.0 <= cfg.attention_dropout < 1.0,
        f"attention_dropout={cfg.attention_dropout} not in [0, 1)",
    )
    need(cfg.optim.lr >= cfg.optim.min_lr >= 0, "need lr >= min_lr >= 0")
    need(cfg.optim.lr_decay_style == "cosine", "only lr_decay_style='cosine' is implemented")
    need(
        cfg.loss_normalization in LOSS_NORMALIZATIONS,
        f"loss_normalization={cfg.loss_normalization!r} not in {LOSS_NORMALIZATIONS}",
    )
    need(cfg.loss_on in LOSS_MODES, f"loss_on={cfg.loss_on!r} not in {LOSS_MODES}")
    need(cfg.nonfinite in ("skip", "halt"), f"nonfinite={cfg.nonfinite!r} not in (skip, halt)")
    need(
        cfg.nonfinite_max_consecutive >= 1,
        f"nonfinite_max_consecutive={cfg.nonfinite_max_consecutive} must be >= 1",
    )
    need(cfg.objective in OBJECTIVES, f"objective={cfg.objective!r} not in {OBJECTIVES}")
    need(
        cfg.dpo.reference in DPO_REFERENCES,
        f"dpo.reference={cfg.dpo.reference!r} not in {DPO_REFERENCES}",
    )
    need(cfg.dpo.beta > 0, f"dpo.beta={cfg.dpo.beta} must be > 0")
    need(cfg.rm.beta >= 0, f"rm.beta={cfg.rm.beta} must be >= 0")
    need(cfg.eval_max_new_tokens >= 1, f"eval_max_new_tokens={cfg.eval_max_new_tokens} < 1")
    need(not cfg.finetune or bool(cfg.load), "finetune=True needs load=<checkpoint or HF dir>")
    need(bool(cfg.data_path), "data_path is empty (point it at a pretokenizer output_dir)")
    need(
        cfg.seq_length <= cfg.model.max_position_embeddings,
        f"seq_length={cfg.seq_length} > model.max_position_embeddings="
        f"{cfg.model.max_position_embeddings}",
    )
    need(
        cfg.eval_prompts in ("", None, "default") or os.path.isfile(cfg.eval_prompts),
        f"eval_prompts={cfg.eval_prompts!r}: no such file (a JSONL of prompts; 'default' for "
        "the shipped ones, '' for none)",
    )
    try:
        sharding.resolve_mesh(cfg.mesh, num_devices, num_layers=cfg.model.num_hidden_layers)
    except ValueError as e:
        raise ValueError(f"{e}{emulation_hint(cfg.mesh, num_devices)}") from None
    accumulation_steps(cfg, num_devices)
    model_config(cfg)


def emulation_hint(mesh: ml_collections.ConfigDict, num_devices: int) -> str:
    """How to get the devices a mesh asks for on a CPU, when it asks for more than exist:
    XLA emulates N host devices (what ``demo.sh`` and the tests set)."""
    needed = math.prod(int(v) for v in dict(mesh).values() if int(v) > 0)
    if needed <= num_devices:
        return ""
    return (
        f"; on a CPU, emulate {needed} devices: XLA_FLAGS="
        f"--xla_force_host_platform_device_count={needed} python -m oasst_jax.train ..."
    )
