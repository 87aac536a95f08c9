"""``python -m oasst_jax.train --config=configs/sft10.py [--config.optim.lr=2e-5 ...]``.

The loop around the jitted step: the run's tokenizer and splits checked, eval, logging,
checkpoints, signals.  The batches come from a feed (sft: ``oasst_jax/sft_feed.py``; rm/dpo
and the DPO reference pre-pass: ``oasst_jax/preference_feed.py``), the start weights from
``oasst_jax/start_weights.py``.  Resumes automatically from ``{workdir}/checkpoints``;
otherwise starts from ``load`` (weights only when ``finetune``) or from a random init.
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

from oasst_jax import (
    atomic_files,
    chatml,
    checkpoint,
    decode,
    distributed,
    hub,
    lora,
    optim,
    sft_feed,
    sharding,
    start_weights,
)
from oasst_jax.cli import cli_main
from oasst_jax.config import accumulation_steps, validate
from oasst_jax.data import outputs
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


def run(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Train to ``train_iters`` (or until a signal / ``exit_interval``); returns last metrics."""
    distributed.initialize(cfg.distributed)
    validate(cfg, jax.device_count())
    mesh = sharding.make_mesh(dict(cfg.mesh))
    model_cfg = start_weights.model_config(cfg)
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
            base, base_record = start_weights.lora_base(cfg, model_cfg, trainer)
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
                state = {
                    **state,
                    "reference": start_weights.reference_weights(cfg, model_cfg, trainer),
                }
            _log(f"resumed from {ckpt.directory} at step {int(state['step'])}")
        elif base is not None:
            state = trainer.init_from_params(base)
            _log(
                f"LoRA rank {model_cfg.lora_rank} on {model_cfg.lora_targets} over the base "
                f"{cfg.load or 'random init'} frozen in {model_cfg.lora_base_dtype}"
            )
        elif cfg.load:
            state = trainer.init_from_params(start_weights.load_weights(cfg, model_cfg, trainer))
            _log(f"loaded weights from {cfg.load} (fresh optimizer, step 0)")
        else:
            state = trainer.init_random(jax.random.key(cfg.seed))
        del base  # a LoRA run holds it frozen (quantized) in the state from here on
        step_fn = trainer.step
        val = None
        if cfg.objective == "sft":
            train_it = sft_feed.SftFeed(
                cfg, sft_feed.open_split(cfg, "train"), loss_mask, trainer, accum
            )
            if evaluates(cfg):
                val = sft_feed.Validation(
                    cfg,
                    sft_feed.open_split(cfg, "val"),
                    loss_mask,
                    trainer.eval,
                    mesh,
                    rows_per_micro,
                )
        else:
            table = None
            if cfg.objective == "dpo" and cfg.dpo.reference == "precomputed":
                ref = start_weights.pre_pass_weights(cfg, model_cfg, trainer, state, restored)
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
    full = atomic_files.out_of_space(error)
    if full is None:
        return
    if not isinstance(error, atomic_files.SpaceError):
        raise atomic_files.space_error(cfg.workdir, full, ckpt.newest()) from error
    if not error.path.startswith(ckpt.directory):
        raise atomic_files.space_error(
            error.path, full, f"{error.kept}; {ckpt.newest()}"
        ) from error


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


def main() -> None:
    cli_main(run, "training config file (configs/*.py)")


if __name__ == "__main__":
    main()
