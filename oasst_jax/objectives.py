"""The objectives of the train step: sft, rm and dpo, each a per-micro-batch tail on the
decoder's outputs -> ``(numerator, sums)``, and the step metrics from their sums.

One seam, :func:`objective_terms` (the full parameter tree, a micro-batch and its decoder
outputs), shared by the scanned and the pipelined step and by evaluation: ``sft`` the LM
head and next-token cross-entropy (:mod:`oasst_jax.loss`), ``rm`` the score head at each
reply's last token and upstream's K-wise ranking loss, ``dpo`` summed reply log-probs
against a reference's (:mod:`oasst_jax.preference_loss` holds those two losses).  ``sums``
are additive over micro-batches (``den`` the denominator: loss tokens, prompts or pairs), so
accumulation divides once per step (:func:`finish_metrics`).  :class:`StepConfig` holds the
step's settings, the objective's among them, and the batch fields and shardings it reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from oasst_jax import preference_loss, sharding
from oasst_jax.loss import loss_sum_and_count, token_cross_entropy
from oasst_jax.model import Llama


@dataclasses.dataclass(frozen=True)
class StepConfig:
    accumulation_steps: int
    micro_batch_size: int
    loss_normalization: str = "global_token_mean"
    seed: int = 0
    # > 1: the micro-batches flow through this many stages of a GPipe schedule
    # (oasst_jax/pipeline_parallel.py); the mesh's pipeline axis size.
    pipeline_stages: int = 1
    # "sft" | "rm" | "dpo" (module doc); rm/dpo: the batch's slots S and groups P
    # (oasst_jax/data/ranked_batches.py), the loss's beta, and where DPO's reference comes from
    objective: str = "sft"
    num_sequences: int = 0
    num_groups: int = 0
    beta: float = 0.0
    reference: str = "on_the_fly"  # or "precomputed": mb["reference_logps"] [S]

    @property
    def on_the_fly_reference(self) -> bool:
        return self.objective == "dpo" and self.reference == "on_the_fly"


# The device fields of an rm/dpo micro-batch beyond the token rows (data/ranked_batches.py);
# a precomputed DPO reference adds ``reference_logps`` [S].
SLOT_FIELDS = ("sequence_row", "sequence_last", "sequence_group", "sequence_rank",
               "sequence_valid")  # fmt: skip
ROW_FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions", "sequence_ids")


def batch_fields(step_cfg: StepConfig) -> tuple[str, ...]:
    """The fields the step reads from each micro-batch."""
    if step_cfg.objective == "sft":
        return ("inputs", "targets", "weights", "segment_ids", "positions")
    extra = ("reference_logps",) if step_cfg.objective == "dpo" and not (
        step_cfg.on_the_fly_reference) else ()  # fmt: skip
    return ROW_FIELDS + SLOT_FIELDS + extra


def batch_shardings(mesh: Mesh, step_cfg: StepConfig, leading: tuple = ()) -> Any:
    """The batch's sharding: one for every field (sft), or per field (rm/dpo: token rows
    over ``batch``/``length``, the small per-slot fields replicated)."""
    rows = sharding.batch_sharding(mesh, leading)
    if step_cfg.objective == "sft":
        return rows
    slots = sharding.logical_sharding(mesh, (*leading, None))
    return {k: rows if k in ROW_FIELDS else slots for k in batch_fields(step_cfg)}


def trunk(
    model: Llama,
    params: Any,
    mb: dict,
    rng: jax.Array,
    dropout_rates: jax.Array,
    deterministic: bool,
) -> jax.Array:
    """The decoder stack's outputs ``[B, L, D]`` of one micro-batch (before the final norm)."""
    return model.apply(
        {"params": params},
        mb["inputs"],
        positions_BL=mb["positions"],
        segment_ids_BL=mb["segment_ids"],
        dropout_rates=dropout_rates,
        deterministic=deterministic,
        rngs={"dropout": rng},
        method=Llama.decode,
    )


def reply_scores(m: Llama, x_BLD: jax.Array, rows_S: jax.Array, last_S: jax.Array) -> jax.Array:
    """A reward model's tail on decoder outputs: :meth:`Llama.hidden`'s final norm, each
    reply's last token, :meth:`Llama.scores`; ``[S]`` fp32.  A function of the module (an
    ``apply`` method) so the pipelined step can run it on the last stage's outputs."""
    return m.scores(preference_loss.last_token(m.final_norm(x_BLD), rows_S, last_S))


def objective_terms(
    model: Llama,
    params: Any,
    x_BLD: jax.Array,
    mb: dict,
    step_cfg: StepConfig,
    reference: Any = None,
    ref_x_BLD: jax.Array | None = None,
):
    """``(numerator, sums)`` of one micro-batch from its decoder outputs: the objective's
    own tail (sft: LM head and cross-entropy; rm: :func:`reply_scores` and the ranking
    loss; dpo: LM head, summed reply log-probs against the reference's), shared by the
    scanned and the pipelined step.  ``ref_x_BLD``: an on-the-fly reference's decoder
    outputs, through ``reference``'s own head."""
    if step_cfg.objective == "rm":
        scores_S = model.apply({"params": params}, x_BLD, mb["sequence_row"],
                               mb["sequence_last"], method=reply_scores)  # fmt: skip
        return rm_terms(scores_S, mb, step_cfg)
    logits = model.apply({"params": params}, x_BLD, method=Llama.head)
    if step_cfg.objective == "sft":
        return sft_terms(logits, mb, step_cfg)
    if step_cfg.on_the_fly_reference:
        ref_logits = model.apply({"params": reference}, ref_x_BLD, method=Llama.head)
        ref_logps = sequence_logps(ref_logits, mb, step_cfg)
    else:
        ref_logps = mb["reference_logps"]
    return dpo_terms(sequence_logps(logits, mb, step_cfg), ref_logps, mb, step_cfg)


def sft_terms(logits: jax.Array, mb: dict, step_cfg: StepConfig):
    """``(numerator, sums)`` of one micro-batch's logits, the sft loss."""
    nll = token_cross_entropy(logits, mb["targets"])
    num, den = loss_sum_and_count(
        nll,
        mb["weights"],
        normalization=step_cfg.loss_normalization,
        micro_batch_size=step_cfg.micro_batch_size,
    )
    return num, {"den": den, "loss_tokens": jnp.sum(mb["weights"])}


def sequence_logps(logits: jax.Array, mb: dict, step_cfg: StepConfig) -> jax.Array:
    """Summed log-probs of each slot's reply loss tokens, ``[S]``."""
    return preference_loss.sequence_logps(
        logits, mb["targets"], mb["weights"], mb["sequence_ids"], step_cfg.num_sequences
    )


def rm_terms(scores_S: jax.Array, mb: dict, step_cfg: StepConfig):
    """The ranking loss of one micro-batch as a sum over its prompts (``den``: prompts),
    accuracy and margin as sums over its pairs."""
    loss, m = preference_loss.rm_loss(
        scores_S, mb["sequence_group"], mb["sequence_rank"], mb["sequence_valid"],
        num_groups=step_cfg.num_groups, beta=step_cfg.beta,
    )  # fmt: skip
    pairs = m["num_pairs"]
    sums = {"den": m["num_prompts"], "num_pairs": pairs, "accuracy": m["accuracy"] * pairs,
            "margin": m["margin"] * pairs}  # fmt: skip
    return loss * m["num_prompts"], sums


def dpo_terms(logps_S: jax.Array, ref_logps_S: jax.Array, mb: dict, step_cfg: StepConfig):
    """The DPO loss of one micro-batch as a sum over its pairs (``den``: pairs), every
    metric of :func:`~oasst_jax.preference_loss.dpo_loss` likewise."""
    slots = (mb["sequence_group"], mb["sequence_rank"], mb["sequence_valid"])
    pc, pr, valid = preference_loss.pair_values(logps_S, *slots, num_pairs=step_cfg.num_groups)
    rc, rr, _ = preference_loss.pair_values(ref_logps_S, *slots, num_pairs=step_cfg.num_groups)
    loss, m = preference_loss.dpo_loss(pc, pr, rc, rr, valid, beta=step_cfg.beta)
    n = m.pop("num_pairs")
    return loss * n, {"den": n, **{k: v * n for k, v in m.items()}}


def finish_metrics(num: jax.Array, sums: dict, step_cfg: StepConfig) -> dict:
    """Step (or evaluation) metrics from summed micro-batch terms: ``loss`` = num / den,
    the sft ``loss_tokens``, or the rm/dpo means over the pairs (``num_pairs``, and the
    rm's ``num_prompts``)."""
    den = sums["den"]
    loss = jnp.where(den > 0, num / jnp.maximum(den, 1e-9), 0.0)
    if step_cfg.objective == "sft":
        return {"loss": loss, "loss_tokens": sums["loss_tokens"]}
    pairs = sums["den"] if step_cfg.objective == "dpo" else sums["num_pairs"]
    out = {"loss": loss, "num_pairs": pairs}
    if step_cfg.objective == "rm":
        out["num_prompts"] = den
    for k, v in sums.items():
        if k not in ("den", "num_pairs"):
            out[k] = v / jnp.maximum(pairs, 1.0)
    return out
