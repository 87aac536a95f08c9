"""``python -m oasst_jax.train --config=configs/sft10.py [--config.optim.lr=2e-5 ...]``.

The loop around the jitted step: data, eval, logging, checkpoints, signals (the rm/dpo
feeds and the DPO reference pre-pass: ``oasst_jax/preference_feed.py``).  Resumes
automatically from ``{workdir}/checkpoints``; otherwise starts from ``load`` (weights
only when ``finetune``) or from a random init.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from oasst_jax import chatml, checkpoint, decode, distributed, files, hub, lora, optim, sharding
from oasst_jax.cli import cli_main
from oasst_jax.config import accumulation_steps, model_config, validate
from oasst_jax.data import outputs, pipeline
from oasst_jax.data.pipeline import BATCH_FIELDS
from oasst_jax.hf.config import is_hf_dir
from oasst_jax.hf.load import load_start_params
from oasst_jax.metrics import MetricsLogger, Timer, progress_line
from oasst_jax.model import Llama, LlamaConfig, hidden_dropout_rates
from oasst_jax.pipeline_parallel import bubble_fraction
from oasst_jax.preference_feed import (
    PreferenceFeed,
    PreferenceValidation,
    open_ranked,
    reference_table,
)
from oasst_jax.tokenizer import Tokenizer
from oasst_jax.train_step import (
    StepConfig,
    all_finite,
    build_trainer,
    model_params,
    reference_params,
)


class _StopFlag:
    """Set by SIGTERM/SIGINT: finish the current step, save, exit 0."""

    def __init__(self):
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        del frame
        print(f"received signal {signum}: saving after this step", flush=True)
        self.set = True


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def open_split(cfg: ml_collections.ConfigDict, split: str) -> Any:
    """``{data_path}/{data_prefix}-{split}``: our shards, or Megatron ``-text``/``-role``
    indexed datasets (upstream's pretokenizer output) when that is what exists;
    missing, unfinished or empty: a one-line error."""
    return outputs.open_source(cfg.data_path, cfg.data_prefix, split)


def evaluates(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run reads the val split: the checks at start-up and the loop agree on it."""
    return bool(cfg.eval_iters and cfg.eval_interval)


def load_tokenizer(cfg: ml_collections.ConfigDict, model_cfg: LlamaConfig) -> Tokenizer | None:
    """The run's tokenizer, checked once against the model's vocabulary: ``tokenizer_path``
    (in the ``megatron_new_tokens`` layout) when set, else the one the train split's
    metadata records (path, relative to where pretokenize ran, and layout) when that file
    is still there with the recorded sha256; else None, which only ``loss_on=
    "assistant_turn"`` trains without.  Every split the run reads (train, and val when
    evaluating) is checked with or without one: not empty, every token id below
    ``model.vocab_size``, and made with this tokenizer (each split's own metadata, not the
    output directory's, which only describes the last pretokenize run into it; a
    Megatron-format split made by upstream's tool, which records no fingerprint, is checked
    against the directory's ``special_tokens.json`` and a pass over its token ids)."""
    if cfg.tokenizer_path:  # a local file, or a hub id: that repository's tokenizer.model
        path = hub.local_or_hub_file(cfg.tokenizer_path, "tokenizer.model", what="tokenizer_path")
        tok, why = Tokenizer(path, megatron_new_tokens=cfg.megatron_new_tokens), ""
    else:
        tok, why = _recorded_tokenizer(cfg)
    if tok is not None and tok.vocab_size != model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok.model_path} has {tok.vocab_size} ids but "
            f"model.vocab_size={model_cfg.vocab_size}"
        )
    splits = ("train", "val") if evaluates(cfg) else ("train",)
    for split in splits:
        outputs.check_source(cfg.data_path, cfg.data_prefix, split, model_cfg.vocab_size, tok)
    if tok is None and cfg.loss_on != "assistant_turn":
        raise ValueError(
            f"loss_on={cfg.loss_on!r} needs the tokenizer (to find the assistant headers) and "
            f"{why}: set tokenizer_path"
        )
    if tok is None and why != _NONE_RECORDED:
        _log(f"warning: {why}; the splits are checked without a tokenizer (tokenizer_path)")
    return tok


_NONE_RECORDED = "the train split records no tokenizer"


def _recorded_tokenizer(cfg: ml_collections.ConfigDict) -> tuple[Tokenizer | None, str]:
    """The tokenizer the train split's metadata records, or None and why not."""
    made = outputs.recorded_tokenizer(cfg.data_path, cfg.data_prefix, "train")
    if made is None:
        return None, _NONE_RECORDED
    path = made["model_path"]
    if not os.path.isfile(path):
        return None, f"the tokenizer the train split records, {path}, is not there"
    tok = Tokenizer(path, megatron_new_tokens=bool(made.get("megatron_new_tokens")))
    if tok.sha256 != made["sha256"]:
        return None, (
            f"the tokenizer the train split records, {path}, has changed since (sha256 "
            f"{tok.sha256[:12]}, recorded {made['sha256'][:12]})"
        )
    return tok, ""


def make_iterator(
    cfg,
    source,
    rows: int,
    loss_mask: pipeline.LossMask,
    *,
    train: bool,
    repeat: bool = True,
    host_rows=None,
) -> pipeline.Batches:
    """The global batch stream, ``rows`` rows per batch (shuffled when ``train``; cycling
    through the split when ``repeat``, else one pass that drops a last partial batch), of
    which this process reads only ``host_rows`` (``None``: all).

    Every process plans the same global batches from the samples' lengths and reads only
    the rows its devices hold (:func:`oasst_jax.data.pipeline.host_rows`), so the batches
    and the losses are the same for any number of hosts, and so is the iterator state a
    checkpoint stores.
    """
    pc = pipeline.PipelineConfig(
        seq_length=cfg.seq_length,
        rows_per_batch=rows,
        packing=cfg.packing,
        seed=cfg.seed,
        shuffle=train,
        num_packing_bins=cfg.num_packing_bins,
        num_threads=cfg.data_threads,
    )
    return pipeline.Batches(source, pc, loss_mask, repeat=repeat, rows=host_rows)


def to_global(host_batch: dict, sharding_, global_shape: tuple[int, ...], rows=None) -> dict:
    """This process's rows of the global batch (``rows``, global row indices; ``None``:
    every row) -> one global array per field, each process transferring only the slices
    its devices hold."""
    return {
        k: jax.make_array_from_callback(
            global_shape, sharding_, pipeline.row_reader(host_batch[k], rows, global_shape)
        )
        for k in BATCH_FIELDS
    }


def resolve_model_config(cfg) -> LlamaConfig:
    """The config's model, or with ``use_checkpoint_args`` the shape stored with the orbax
    checkpoint in ``load`` (numerics and attention choices stay the run's own)."""
    model_cfg = model_config(cfg)
    if not (cfg.use_checkpoint_args and cfg.load) or is_hf_dir(cfg.load):
        return model_cfg
    stored = checkpoint.load_model_config(cfg.load)
    keep = ("dtype", "remat_policy", "attention_impl", "attention_backend", "attention_dropout")
    keep += tuple(f.name for f in dataclasses.fields(LlamaConfig) if f.name.startswith("lora_"))
    return dataclasses.replace(stored, **{k: getattr(model_cfg, k) for k in keep})


def run(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Train to ``train_iters`` (or until a signal / ``exit_interval``); returns last metrics."""
    distributed.initialize(cfg.distributed)
    validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(dict(cfg.mesh))
    model_cfg = resolve_model_config(cfg)
    if cfg.objective == "rm":
        model_cfg = dataclasses.replace(model_cfg, score_head=True)
    tokenizer = load_tokenizer(cfg, model_cfg)
    loss_mask = functools.partial(chatml.loss_mask, tokenizer=tokenizer, mode=cfg.loss_on)
    model = Llama(model_cfg)
    tx = optim.make_optimizer(cfg.optim, cfg.train_iters)
    accum = accumulation_steps(cfg, jax.device_count())
    rows_per_micro = cfg.global_batch_size // accum
    rates = hidden_dropout_rates(model_cfg.num_hidden_layers, cfg.hidden_dropout, cfg.lima_dropout)
    stages = sharding.axis_size(mesh, "stage")
    step_cfg = StepConfig(
        accum, cfg.micro_batch_size, cfg.loss_normalization, cfg.seed, stages,
        objective=cfg.objective, num_sequences=cfg.preference.max_sequences,
        num_groups=cfg.preference.max_groups,
        beta=float(cfg.dpo.beta if cfg.objective == "dpo" else cfg.rm.beta),
        reference=cfg.dpo.reference,
    )  # fmt: skip

    with jax.set_mesh(mesh):
        trainer = build_trainer(
            model, tx, optim.schedule(cfg.optim, cfg.train_iters), step_cfg, rates, mesh
        )
        ckpt = checkpoint.TrainCheckpointer(
            os.path.join(cfg.workdir, "checkpoints"), cfg.keep_checkpoints, cfg.async_checkpointing
        )
        # the optimizer settings shape the saved opt_state: stored so a resume that no
        # longer fits names the one that changed
        settings = {f"optim.{k}": v for k, v in cfg.optim.items()}
        base = base_record = None
        if model_cfg.lora_rank:
            base, base_record = _lora_base(cfg, model_cfg, trainer)
        restored = ckpt.restore(
            trainer.abstract_state,
            model_cfg,
            settings,
            None if base is None else lambda meta, where: lora.check_base(meta, base_record, where),
        )
        data_state = val_state = None
        if restored is not None:
            state, meta = restored
            data_state, val_state = meta.get("data_iterator"), meta.get("val_iterator")
            if base is not None:  # adapters and optimizer from the checkpoint, base as loaded
                state = {**state, "frozen": trainer.init_from_params(base)["frozen"]}
            elif "reference" in trainer.abstract_state:  # DPO: the starting weights again
                state = {**state, "reference": _reference_weights(cfg, model_cfg, trainer)}
            _log(f"resumed from {ckpt.directory} at step {int(state['step'])}")
        elif base is not None:
            state = trainer.init_from_params(base)
            _log(
                f"LoRA rank {model_cfg.lora_rank} on {model_cfg.lora_targets} over the base "
                f"{cfg.load or 'random init'} frozen in {model_cfg.lora_base_dtype}"
            )
        elif cfg.load:
            state = trainer.init_from_params(_start_weights(cfg, model_cfg, trainer))
            _log(f"loaded weights from {cfg.load} (fresh optimizer, step 0)")
        else:
            state = trainer.init_random(jax.random.key(cfg.seed))
        del base  # a LoRA run holds it frozen (quantized) in the state from here on
        step_fn = trainer.step
        val = None
        if cfg.objective == "sft":
            train_it = SftFeed(cfg, open_split(cfg, "train"), loss_mask, trainer, accum)
            if evaluates(cfg):
                val = Validation(
                    cfg, open_split(cfg, "val"), loss_mask, trainer.eval, mesh, rows_per_micro
                )
        else:
            table = None
            if cfg.objective == "dpo" and cfg.dpo.reference == "precomputed":
                ref = _pre_pass_weights(cfg, model_cfg, trainer, state, restored)
                splits = ("train", "val") if evaluates(cfg) else ("train",)
                table = reference_table(cfg, trainer, ref, splits, loss_mask, mesh)
            train_it = PreferenceFeed(
                cfg, open_ranked(cfg, "train"), loss_mask, trainer, accum, train=True,
                table=None if table is None else table["train"],
            )  # fmt: skip
            if evaluates(cfg):
                val = PreferenceValidation(cfg, open_ranked(cfg, "val"), loss_mask, trainer,
                                           accum, None if table is None else table["val"],
                                           mesh)  # fmt: skip
        if data_state is not None:
            train_it.set_state(data_state)
        if val is not None and val_state is not None:
            val.set_state(val_state)

        logger = MetricsLogger(cfg.workdir, wandb=wandb_options(cfg), run_config=cfg.to_dict(),
                               start_step=int(state["step"]))  # fmt: skip
        prompts = sample_prompts(cfg, tokenizer)
        flops_tok = model_cfg.flops_per_token(cfg.seq_length)
        _log(
            f"model {model_cfg.num_params() / 1e6:.1f}M params | mesh {dict(mesh.shape)} | "
            f"accumulation {accum} x {rows_per_micro} rows x {cfg.seq_length} tokens"
        )
        if stages > 1:
            _log(
                f"pipeline: {stages} stages x {model_cfg.num_hidden_layers // stages} layers, "
                f"{accum} micro-batches, bubble {bubble_fraction(stages, accum):.1%}"
            )
        stop = _StopFlag()
        timer = Timer()
        step = int(state["step"])
        guard = _NonFiniteGuard(cfg, ckpt.directory, step if restored is not None else None)
        pending = None
        last = {}
        window = _Window(step)
        checkpoint.quiet_background_space_errors()
        try:
            while step < cfg.train_iters:
                with timer("data_wait"):
                    batch, host_stats = train_it.next()
                with timer("step_dispatch"):
                    state, metrics = step_fn(state, batch)
                step += 1
                if pending is not None:
                    last = _report(cfg, logger, pending, window, flops_tok, timer, guard)
                pending = (step, metrics, host_stats, {})
                if val is not None and (step % cfg.eval_interval == 0 or step == cfg.train_iters):
                    if cfg.objective == "sft":
                        vm = val(trainer.eval_params(state))
                    else:
                        vm = val(trainer.eval_params(state), reference_params(state, step_cfg))
                    pending[3].update(vm)
                    _log(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in vm.items()))
                evaluating = cfg.eval_interval and (
                    step % cfg.eval_interval == 0 or step == cfg.train_iters
                )
                if prompts and evaluating:
                    pending[3]["time_samples"] = log_samples(
                        cfg, logger, step, model_cfg,
                        model_params(state["params"], state.get("frozen")), mesh, tokenizer,
                        prompts,
                    )  # fmt: skip
                exiting = stop.set or (cfg.exit_interval and step % cfg.exit_interval == 0)
                if (
                    (cfg.save_interval and step % cfg.save_interval == 0)
                    or exiting
                    or (step == cfg.train_iters)
                ):
                    # this step's metrics first: a run halted for non-finite steps saves nothing
                    last = _report(cfg, logger, pending, window, flops_tok, timer, guard)
                    pending = None
                    with timer("checkpoint"):
                        meta = {"data_iterator": train_it.get_state()}
                        if base_record is not None:
                            meta[lora.BASE_META] = base_record
                        if val is not None and val.get_state() is not None:
                            meta["val_iterator"] = val.get_state()
                        _save(ckpt, step, state, meta, model_cfg, settings, guard)
                if exiting:
                    _log(f"stopping cleanly after step {step}")
                    break
            if pending is not None:
                last = _report(cfg, logger, pending, window, flops_tok, timer, guard)
        except OSError as e:
            _raise_if_full_disk(e, cfg, ckpt)
            raise
        finally:  # saves already started complete; metrics written so far stay
            try:
                try:
                    ckpt.close()
                finally:
                    logger.close()
            except OSError as e:
                _raise_if_full_disk(e, cfg, ckpt)
                raise
    distributed.finished()  # the other processes may still be finishing: not a lost peer
    return last


def _raise_if_full_disk(error: OSError, cfg, ckpt: checkpoint.TrainCheckpointer) -> None:
    """A full disk met by the loop (a save, metrics, samples, tensorboard) as one line
    naming the path, what that file kept and the checkpoint a restart resumes from (a
    save's own line says that already); any other error is left to the caller."""
    full = files.out_of_space(error)
    if full is None:
        return
    if not isinstance(error, files.SpaceError):
        raise files.space_error(cfg.workdir, full, ckpt.newest()) from error
    if not error.path.startswith(ckpt.directory):
        raise files.space_error(error.path, full, f"{error.kept}; {ckpt.newest()}") from error


def _start_weights(cfg, model_cfg: LlamaConfig, trainer) -> Any:
    """The ``load=`` weights placed as the state's params (a reward model's score head,
    which an SFT checkpoint lacks, freshly drawn from the seed; never read from ``load``)."""
    abstract = dict(trainer.abstract_state["params"])
    score = abstract.pop("score", None)
    if score is not None:
        model_cfg = dataclasses.replace(model_cfg, score_head=False)
    params = load_start_params(cfg.load, model_cfg, abstract, where=f"load={cfg.load}")
    if score is not None:
        kernel = score["kernel"]
        draw = jax.random.normal(jax.random.key(cfg.seed), kernel.shape, kernel.dtype)
        params["score"] = {
            "kernel": jax.device_put(draw * model_cfg.initializer_range, kernel.sharding)
        }
    return params


def _reference_weights(cfg, model_cfg: LlamaConfig, trainer) -> Any:
    """A full DPO run's reference: its starting weights (``load=``, else the seed's init)."""
    if cfg.load:
        return _start_weights(cfg, model_cfg, trainer)
    return trainer.init_random(jax.random.key(cfg.seed))["params"]  # = its reference


def _pre_pass_weights(cfg, model_cfg: LlamaConfig, trainer, state: dict, restored) -> Any:
    """The weights a DPO reference pre-pass runs: a LoRA run's base (adapters off), a
    fresh state's own params, or ``load=`` again on resume."""
    if "frozen" in state:
        return model_params(jax.tree.map(np.zeros_like, state["params"]), state["frozen"])
    if restored is None:
        return state["params"]
    return _reference_weights(cfg, model_cfg, trainer)


def wandb_options(cfg: ml_collections.ConfigDict) -> dict[str, str] | None:
    """``MetricsLogger``'s ``wandb`` argument from ``cfg.logging`` (None: W&B off)."""
    lg = cfg.logging
    if not lg.wandb:
        return None
    return {"project": lg.wandb_project, "entity": lg.wandb_entity, "name": lg.wandb_name}


def sample_prompts(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None) -> list[str]:
    """The eval-time generation prompts (decoded at every ``eval_interval`` and at the
    last step): none without a tokenizer (nothing to decode with), for a reward model (it
    does not generate), or with ``eval_prompts`` empty."""
    if tokenizer is None or cfg.objective == "rm" or not cfg.eval_prompts:
        return []
    return decode.eval_prompts(None if cfg.eval_prompts == "default" else cfg.eval_prompts)


def log_samples(
    cfg, logger: MetricsLogger, step: int, model_cfg: LlamaConfig, params: Any, mesh,
    tokenizer: Tokenizer, prompts: list[str],
) -> float:  # fmt: skip
    """Greedy replies to ``prompts`` from the current weights (every process decodes, as
    the params are sharded over all of them; process 0 writes); returns the seconds."""
    t0 = time.perf_counter()
    replies = decode.greedy_replies(
        model_cfg, params, mesh, tokenizer, prompts, cfg.eval_max_new_tokens
    )
    logger.log_samples(step, list(zip(prompts, replies, strict=True)))
    return time.perf_counter() - t0


def _lora_base(cfg, model_cfg: LlamaConfig, trainer) -> tuple[Any, dict]:
    """A LoRA run's base weights (``load``, else the seed's random init) and the record a
    checkpoint keeps of them (path + content fingerprint), computed before any restore so
    a checkpoint trained on another base is refused."""
    if cfg.load:
        base = load_start_params(
            cfg.load,
            lora.base_model_config(model_cfg),
            trainer.abstract_base,
            where=f"load={cfg.load}",
        )
    else:
        base = trainer.random_base(jax.random.key(cfg.seed))
    return base, lora.base_record(cfg.load, base, model_cfg.vocab_size)


class _Window:
    """Wall time and steps since the last progress line (throughput is averaged over it)."""

    def __init__(self, step: int):
        self.reset(step)

    def reset(self, step: int) -> None:
        self.step, self.t0 = step, time.perf_counter()


class _NonFiniteGuard:
    """Counts steps whose loss or gradient was NaN/Inf (their update is skipped by the
    optimizer) and ends the run: at once with ``nonfinite='halt'``, after
    ``nonfinite_max_consecutive`` in a row with ``'skip'`` (a diverged run, not a spike)."""

    def __init__(self, cfg, directory: str, saved: int | None):
        self.policy, self.limit = cfg.nonfinite, cfg.nonfinite_max_consecutive
        self.directory, self.saved = directory, saved
        self.in_a_row = 0

    def kept(self) -> str:
        if self.saved is None:
            return "no checkpoint was written"
        return f"newest checkpoint: {self.directory}/{self.saved}"

    def check(self, step: int, nonfinite: bool) -> None:
        if not nonfinite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.policy == "halt" or self.in_a_row >= self.limit:
            raise SystemExit(
                f"error: step {step}: loss/grad NaN or Inf, {self.in_a_row} step(s) in a row "
                f"(nonfinite={self.policy!r}, nonfinite_max_consecutive={self.limit}); "
                f"{self.kept()}"
            )
        _log(
            f"step {step}: loss/grad NaN or Inf, update skipped "
            f"({self.in_a_row} in a row; the run stops at {self.limit})"
        )


def _save(ckpt, step: int, state: dict, meta: dict, model_cfg, settings, guard) -> None:
    """Save ``step``, except inside a run of NaN/Inf steps (it would rotate the checkpoints
    from before it out) and never parameters that hold NaN/Inf."""
    if guard.in_a_row:
        _log(f"step {step}: loss/grad NaN or Inf, not saving ({guard.kept()})")
        return
    if not bool(all_finite(state["params"])):
        raise SystemExit(
            f"error: step {step}: the parameters hold NaN/Inf; not saving them ({guard.kept()})"
        )
    ckpt.save(step, state, meta, model_cfg, settings)
    guard.saved = step


def _split_name(cfg, split: str) -> str:
    """``{data_path}/{data_prefix}-{split}``, as errors name a split."""
    return os.path.join(cfg.data_path, f"{cfg.data_prefix}-{split}")


def _next_batch(it, split: str) -> dict:
    try:
        return next(it)
    except StopIteration:
        raise ValueError(f"{split}: the split yields no batches (no usable samples)") from None


def _report(
    cfg, logger, pending, window: _Window, flops_tok: float, timer: Timer, guard: _NonFiniteGuard
) -> dict:
    """Read step metrics (one step late, so dispatch stays ahead) and log at intervals."""
    step, metrics, host_stats, val = pending
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    m.update(host_stats)
    m.update(val)
    due = cfg.log_interval and (step % cfg.log_interval == 0 or step == cfg.train_iters)
    if due or val or m["nonfinite"]:  # a non-finite step is always logged
        _write(cfg, logger, step, m, window, flops_tok, timer)
    guard.check(step, bool(m["nonfinite"]))
    return m


def _write(cfg, logger, step: int, m: dict, window: _Window, flops_tok: float, timer: Timer):
    """Add throughput to ``m`` and write it (metrics.jsonl, tensorboard, progress line)."""
    dt = max(time.perf_counter() - window.t0, 1e-9)
    tokens = cfg.global_batch_size * cfg.seq_length * max(step - window.step, 1)
    m.update(
        step_time=dt / max(step - window.step, 1),
        tokens_per_s=tokens / dt,
        mfu=flops_tok * tokens / dt / (jax.device_count() * cfg.peak_flops_per_device),
    )
    m.update({f"time_{k}": v for k, v in timer.pop().items()})
    logger.write(step, m)
    _log(progress_line(step, cfg.train_iters, m))
    window.reset(step)


class Validation:
    """Evaluation as Megatron-LLM runs it.

    One evaluation is ``eval_iters`` **global** batches (``global_batch_size`` rows
    each: the card's 10 x 64 = 640 samples), read from one validation stream that
    persists across evaluations: each evaluation continues where the last one
    stopped, cycling through the split in its stored order (unshuffled).  The
    stream's position is saved with every checkpoint (``meta["val_iterator"]``), so a
    resumed run evaluates the samples an uninterrupted one would.  Each global batch
    is run in the train step's micro-batches (``rows_per_micro`` rows) and the loss
    is normalised as training's (``loss_normalization``; ``microbatch_mean`` is
    Megatron's mean over all the evaluation's micro-batches of each one's own mean).

    ``eval_full``: every sample of the split exactly once instead, in order from the
    first (the last micro-batch filled up with empty rows), the same data at every
    evaluation, so checkpoints compare on equal terms; there is no stream to save.
    """

    def __init__(self, cfg, source, loss_mask, eval_fn, mesh, rows_per_micro: int):
        self.cfg, self.source, self.loss_mask = cfg, source, loss_mask
        self.eval_fn, self.rows = eval_fn, rows_per_micro
        self.shard = sharding.batch_sharding(mesh)
        self.name = _split_name(cfg, "val")
        self.stream = None
        shape = pipeline.batch_shape(rows_per_micro, cfg.seq_length)
        self.micro_rows = pipeline.host_rows(self.shard, shape)  # each micro-batch's, here
        if not cfg.eval_full:
            chunks = range(0, cfg.global_batch_size, rows_per_micro)
            mine = np.concatenate([i + self.micro_rows for i in chunks])
            self.stream = make_iterator(
                cfg, source, cfg.global_batch_size, loss_mask, train=False, host_rows=mine
            )

    def get_state(self) -> dict | None:
        """The stream's position, for the checkpoint (None with ``eval_full``)."""
        return None if self.stream is None else self.stream.get_state()

    def set_state(self, state: dict) -> None:
        """Continue the stream from a checkpoint's ``meta["val_iterator"]``."""
        if self.stream is not None:
            self.stream.set_state(state)

    def __call__(self, params) -> dict[str, float]:
        shape = pipeline.batch_shape(self.rows, self.cfg.seq_length)
        if self.stream is None:
            terms = [self.eval_fn(params, to_global(c, self.shard, shape)) for c in self._full()]
        else:
            terms = [
                self.eval_fn(params, to_global(c, self.shard, shape, self.micro_rows))
                for c in self._continued()
            ]
        if not terms:
            raise ValueError(f"{self.name}: the split yields no batches (no usable samples)")
        return eval_metrics(terms)

    def _continued(self):
        """``eval_iters`` global batches from the stream, cut into micro-batches as the
        train step cuts its global batch."""
        n = len(self.micro_rows)  # this host's rows of each micro-batch
        for _ in range(self.cfg.eval_iters):
            batch = _next_batch(self.stream, self.name)
            for i in range(0, len(batch["inputs"]), n):
                yield {k: batch[k][i : i + n] for k in BATCH_FIELDS}

    def _full(self):
        """One pass over the split, one row at a time, in micro-batches of ``rows``."""
        it = make_iterator(self.cfg, self.source, 1, self.loss_mask, train=False, repeat=False)
        rows = []
        for row in it:
            rows.append(row)
            if len(rows) == self.rows:
                yield _stack_rows(rows)
                rows = []
        if rows:
            empty = {k: np.zeros_like(rows[0][k]) for k in BATCH_FIELDS}  # no loss tokens
            yield _stack_rows(rows + [empty] * (self.rows - len(rows)))


def _stack_rows(rows: list[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows]) for k in BATCH_FIELDS}


def eval_metrics(terms: list) -> dict[str, float]:
    """``val_loss`` = sum of numerators / sum of denominators over an evaluation's
    micro-batches (:func:`~oasst_jax.train_step.make_eval_step`'s terms), its
    perplexity, and the loss tokens it read.  NaN when it read no loss token."""
    num, den, tokens = np.asarray(jax.device_get(terms), np.float64).sum(axis=0)
    loss = float(num / den) if den > 0 else float("nan")
    return {
        "val_loss": loss,
        "val_ppl": float(np.exp(min(loss, 50.0))),
        "val_loss_tokens": float(tokens),
    }


# ------------------------------------------------------- the sft feed (rm/dpo: preference_feed)


class SftFeed:
    """The sft global batch stream placed on the mesh, with its host-side statistics."""

    def __init__(self, cfg, source, loss_mask, trainer, accum: int):
        self.shard, self.name = trainer.batch_sharding, _split_name(cfg, "train")
        rows = cfg.global_batch_size // accum
        self.shape = pipeline.batch_shape(rows, cfg.seq_length, accumulation=accum)
        self.rows = pipeline.host_rows(self.shard, self.shape)  # the rows read here
        self.it = make_iterator(
            cfg, source, cfg.global_batch_size, loss_mask, train=True, host_rows=self.rows
        )

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)

    def next(self) -> tuple[dict, dict[str, float]]:
        host = _next_batch(self.it, self.name)
        return to_global(host, self.shard, self.shape, self.rows), dict(self.it.stats)


if __name__ == "__main__":
    cli_main(run, "training config file (configs/*.py)")
