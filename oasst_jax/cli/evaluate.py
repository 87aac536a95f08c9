"""lm-evaluation-harness on our checkpoints: a registered ``lm_eval`` model and its CLI.

    python -m oasst_jax.evaluate --ckpt CKPT --tokenizer tokenizer.model --tasks T1,T2 \\
        [--include-path DIR] [--limit N] [--apply-chat-template] --out results.json

:class:`OasstJaxLM` (registered as ``oasst_jax``) answers the three request kinds of
lm-eval's ``LM`` API on an orbax checkpoint root (or a Hugging Face directory), with
the parameters sharded over a ``tensor`` x ``fsdp`` mesh (the rest of the devices
data-parallel) by the same helpers the sampler uses, and requests run in fixed-shape
batches (rows sharded over the data axes, lengths rounded up to a few buckets, so a
task compiles a handful of programs):

- ``loglikelihood``: the continuation's summed log-probability and whether greedy
  decoding reproduces it, computed on device (only two numbers per request come back);
- ``loglikelihood_rolling``: lm-eval's own disjoint rolling windows over the model's
  context (``lm_eval.utils``), each scored as above and summed per document;
- ``generate_until``: ``oasst_jax.decode`` (greedy, or sampled when the task asks),
  stopped at ``<|im_end|>``/EOS and cut at the task's stop strings.

Tokenisation, truncation, the empty-context prefix (BOS), the decoded text (special
tokens dropped) and stop handling are those of lm-eval's ``hf`` model, so the numbers
equal ``hf`` on the exported model (``python -m oasst_jax.convert orbax-to-hf``;
``tests/test_cli_evaluate.py``).  ``--apply-chat-template`` formats every request as
chatml (:meth:`OasstJaxLM.apply_chat_template`), as the model was trained.

The output is what ``lm_eval.simple_evaluate`` returns (``results``, ``configs``,
``versions``, ``n-shot``, ``config``, ...; per-sample records with ``--log-samples``),
made strict JSON (non-serialisable values as lm-eval's CLI writes them, NaN/Inf as
``null``), written atomically.  Task names are first looked up in ``--include-path``
alone (offline and fast); lm-eval's built-in tasks are indexed only when a name is
not found there.  Local tasks read local data, e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: path/to/data.jsonl}}`` (relative paths are
relative to the working directory, as in lm-eval).

On a multi-host job every process runs every request (the forward passes are SPMD
programs over the whole mesh); only process 0 writes the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from oasst_jax import atomic_files, cli, decode, sharding, weights

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError:  # the model class cannot even be defined without it
    cli.fail("oasst_jax.evaluate needs lm-evaluation-harness: pip install -e '.[eval]'")
from oasst_jax.chatml import format_turn
from oasst_jax.hf.tokenizer import CHAT_TEMPLATE
from oasst_jax.model import Llama
from oasst_jax.tokenizer import IM_START, model_dir_tokenizer

MIN_LENGTH_BUCKET = 32  # shortest padded length; longer ones double up to the context
MAX_GEN_TOKS = 256  # lm-eval's default when a task sets no max_gen_toks
# generation settings a task may give (lm-eval names) -> decode.SamplingParams fields
SAMPLING_KWARGS = {"temperature", "top_k", "top_p", "repetition_penalty", "do_sample"}


def length_bucket(n: int, limit: int) -> int:
    """The padded length for a batch whose longest row has ``n`` tokens: the next
    power of two from :data:`MIN_LENGTH_BUCKET`, but never past ``limit`` rounded up
    to the bucket size (the context), so a task compiles O(log context) programs."""
    cap = -(-limit // MIN_LENGTH_BUCKET) * MIN_LENGTH_BUCKET
    return min(max(MIN_LENGTH_BUCKET, 1 << max(n - 1, 0).bit_length()), cap)


def _scores(model: Llama, params: Any, tokens_BL: jax.Array, targets_BL, mask_BL):
    """Per row: the summed log-probability of ``targets`` where ``mask`` is set, and
    whether the argmax equals the target at every such position."""
    logits_BLV = model.apply({"params": params}, tokens_BL)
    logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
    logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
    greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
    return jnp.sum(jnp.where(mask_BL, logp_BL, 0.0), axis=-1), jnp.all(greedy_BL | ~mask_BL, -1)


_scores_jit = jax.jit(_scores, static_argnames=("model",))


class Progress:
    """A tqdm bar on a terminal; plain ``what: done/total`` lines (about ten per run)
    otherwise, so logs of batch jobs stay readable."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.bar = what, total, 0, None
        self.step = max(1, total // 10)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done == self.total or self.done // self.step > before // self.step:
            print(f"{self.what}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@register_model("oasst_jax")
class OasstJaxLM(TemplateLM):
    """An orbax checkpoint (or HF directory) on a mesh, as an lm-eval model.

    ``batch_size`` rows per forward pass (a multiple of the data-parallel devices);
    ``tensor`` / ``fsdp``: how the parameters are split (the remaining devices take
    data-parallel rows).  ``max_batch_size`` and ``device`` are what lm-eval passes
    every model; they have no meaning here.
    """

    def __init__(
        self,
        ckpt: str,
        tokenizer: str | None = None,
        batch_size: int | str | None = 8,
        tensor: int = 1,
        fsdp: int = 1,
        step: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        super().__init__()
        del max_batch_size, device
        shape = {sharding.DATA: -1, sharding.FSDP: int(fsdp), sharding.TENSOR: int(tensor)}
        self.mesh = sharding.make_mesh(shape)
        rows = sharding.axis_size(self.mesh, "batch")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size {batch_size!r}: give a number of rows (no 'auto')")
        self.batch_rows = int(batch_size or 8)
        if self.batch_rows % rows:
            raise ValueError(
                f"batch_size {self.batch_rows} is not a multiple of the {rows} data-parallel "
                f"devices ({dict(self.mesh.shape)})"
            )
        self.params, self.cfg = weights.load_for_inference(
            ckpt, self.mesh, step=None if step is None else int(step), dtype=dtype
        )
        self.model = Llama(self.cfg)
        self.tok = model_dir_tokenizer(ckpt, self.cfg.vocab_size, tokenizer)
        sp = spm.SentencePieceProcessor(model_file=self.tok.model_path)
        # what the hf model's decode(skip_special_tokens=True) drops: unk, bos, eos, extras
        self._special = {sp.unk_id(), *self.tok.special_tokens().values()}
        self.stop_ids = (self.tok.im_end_id, self.tok.eos_id)
        self.seed = int(seed)
        self.info = {"ckpt": ckpt, "step": step, "dtype": self.cfg.dtype}

    # ------------------------------------------------------------ tokens and template

    @property
    def eot_token_id(self) -> int:
        """``<|im_end|>``: the end of a turn, the model's end of text (the exported HF
        tokenizer's ``eos_token``)."""
        return self.tok.im_end_id

    @property
    def prefix_token_id(self) -> int:
        """BOS: what an empty context and rolling windows are conditioned on."""
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.cfg.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return f"oasst_jax-{self.tok.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        """Our encoding: special-token strings become their ids, nothing is added."""
        del add_special_tokens  # no BOS is ever added (samples start with <|im_start|>)
        return self.tok.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids without special tokens (as ``hf`` decodes them)."""
        return self.tok.decode(i for i in ids if int(i) not in self._special)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return CHAT_TEMPLATE if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """chatml text of the history (``prompter`` is a user): ending with the assistant
        header, or, to prefill an assistant message, with that message left open."""
        turns = [(_role(m["role"]), m["content"]) for m in chat_history]
        if add_generation_prompt:
            return "".join(format_turn(r, c) for r, c in turns) + f"{IM_START}assistant\n"
        *done, (role, content) = turns
        return "".join(format_turn(r, c) for r, c in done) + f"{IM_START}{role}\n{content}"

    def get_model_info(self) -> dict:
        return {**self.info, "model_num_parameters": self.cfg.num_params()}

    # ------------------------------------------------------------ scoring

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **_,
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy?)`` per ``(key, context, continuation)``.

        The input is the last ``max_length + 1`` tokens of context + continuation
        (left-truncated as ``hf`` does); rows are sorted longest first so each batch
        pads little, and answered in the original order.
        """
        rows = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored with a "
                    f"context window of {self.max_length}"
                )
            rows.append((context + continuation)[-(self.max_length + 1) :])
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        progress = Progress("loglikelihood", len(rows)) if not disable_tqdm else None
        for batch in _chunks(order, self.batch_rows):
            length = length_bucket(len(rows[batch[0]]) - 1, self.max_length)
            tokens, targets, mask = np.zeros((3, self.batch_rows, length), np.int32)
            for r, i in enumerate(batch):
                seq, n_cont = rows[i], len(requests[i][2])
                tokens[r, : len(seq) - 1], targets[r, : len(seq) - 1] = seq[:-1], seq[1:]
                mask[r, len(seq) - 1 - n_cont : len(seq) - 1] = 1
            logp, greedy = self._score(tokens, targets, mask.astype(bool))
            for r, i in enumerate(batch):
                out[i] = (float(logp[r]), bool(greedy[r]))
            if progress:
                progress.update(len(batch))
        if progress:
            progress.close()
        return out

    def _score(self, tokens, targets, mask) -> tuple[np.ndarray, np.ndarray]:
        shard = sharding.batch_sharding(self.mesh)
        with jax.set_mesh(self.mesh):
            args = [jax.device_put(a, shard) for a in (tokens, targets, mask)]
            logp, greedy = _scores_jit(self.model, self.params, *args)
        return np.asarray(jax.device_get(logp)), np.asarray(jax.device_get(greedy))

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Each document's total log-likelihood over lm-eval's disjoint rolling windows
        (``max_length`` tokens of context each, BOS first), all windows batched together."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        for n, (logp, _) in zip(owner, scores, strict=True):
            totals[n] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded by ``oasst_jax.decode``; requests with the same
        generation settings batch together (batch padded to ``batch_size`` rows so the
        decode loop compiles once per prompt-length bucket)."""
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out = [""] * len(requests)
        progress = Progress("generate_until", len(requests)) if not disable_tqdm else None
        for members in groups.values():
            sp, until = self._sampling(requests[members[0]].args[1])
            room = self.max_length - sp.max_new_tokens  # contexts are left-truncated to it
            prompts = {n: self.tok_encode(requests[n].args[0])[-room:] for n in members}
            members.sort(key=lambda n: -len(prompts[n]))
            for batch in _chunks(members, self.batch_rows):
                ids = [prompts[n] for n in batch]
                ids += [ids[-1]] * (self.batch_rows - len(ids))
                gen = decode.generate(
                    self.params, self.cfg, ids, sp, self.stop_ids, seed=self.seed, mesh=self.mesh
                )
                for n, got in zip(batch, gen.ids, strict=False):
                    text = postprocess_generated_text(self.tok_decode(got), until, None)
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                if progress:
                    progress.update(len(batch))
        if progress:
            progress.close()
        return out

    def _sampling(self, gen_kwargs: dict) -> tuple[decode.SamplingParams, list[str]]:
        """A task's generation settings as ``SamplingParams`` plus its stop strings
        (``<|im_end|>`` added, as ``hf`` adds its EOS string)."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation settings must be a dict, got {gen_kwargs!r}")
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), MAX_GEN_TOKS)
        until = handle_stop_sequences(
            kwargs.pop("until", None), eos=self.tok.decode([self.eot_token_id])
        )
        max_new = int(kwargs.pop("max_gen_toks"))
        unknown = sorted(set(kwargs) - SAMPLING_KWARGS)
        if unknown:
            raise ValueError(
                f"generation setting(s) {unknown} are not supported "
                f"(supported: until, max_gen_toks, {sorted(SAMPLING_KWARGS)})"
            )
        if max_new >= self.max_length:
            raise ValueError(
                f"max_gen_toks {max_new} leaves no room for the prompt in the context window "
                f"of {self.max_length}"
            )
        sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        sp = decode.SamplingParams(
            max_new_tokens=max_new,
            temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
        )
        return sp, until


def _role(role: str) -> str:
    return "user" if role == "prompter" else role  # Open-Assistant's name for the user


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# ---------------------------------------------------------------------------- results


def json_safe(obj: Any) -> Any:
    """``simple_evaluate``'s result as strict JSON: values JSON cannot hold are turned
    as lm-eval's CLI turns them (``handle_non_serializable``), NaN/Inf into ``None``."""
    plain = json.loads(json.dumps(obj, default=lm_utils.handle_non_serializable))

    def fix(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, list):
            return [fix(v) for v in o]
        return o

    return fix(plain)


def task_manager(names: Sequence[str], include_path: str | None):
    """A ``TaskManager`` that knows every name: ``include_path`` alone when it has them
    all (indexing lm-eval's ~15k built-in tasks takes a while), else with the built-ins.
    An unknown name is a one-line error."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path}: no such directory")
    tm = None
    if include_path is not None:
        tm = TaskManager(include_path=include_path, include_defaults=False)
    if tm is None or set(names) - set(tm.all_tasks):
        tm = TaskManager(include_path=include_path)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        where = f" (looked in {include_path} and lm-eval's tasks)" if include_path else ""
        raise ValueError(f"unknown task(s) {', '.join(missing)}{where}")
    return tm


def evaluate(args: argparse.Namespace) -> dict:
    """``lm_eval.simple_evaluate`` with our registered model, made JSON-safe."""
    import lm_eval

    names = [t for t in args.tasks.split(",") if t]
    if not names:
        raise ValueError("--tasks names no task")
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such checkpoint")
    tm = task_manager(names, args.include_path)
    model_args = {
        "ckpt": args.ckpt,
        "tokenizer": args.tokenizer,
        "tensor": args.tensor,
        "fsdp": args.fsdp,
        "step": args.step,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    results = lm_eval.simple_evaluate(
        model="oasst_jax",
        model_args={k: v for k, v in model_args.items() if v is not None},
        tasks=names,
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.apply_chat_template,
        system_instruction=args.system_instruction,
        log_samples=args.log_samples,
        task_manager=tm,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    return json_safe(results)


def _limit(text: str) -> int | float:
    """lm-eval's ``--limit``: a count of examples per task, or a fraction below 1."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value if value < 1 else int(value)


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m oasst_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_model_arguments()
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="directory of task YAMLs (searched first)")
    p.add_argument("--limit", type=_limit, help="examples per task (< 1: a fraction)")
    p.add_argument("--out", required=True, help="results JSON (lm-eval's layout)")
    p.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="format requests as chatml (few-shot examples as turns)",
    )
    p.add_argument("--system-instruction", help="system turn / prefix for every request")
    p.add_argument("--log-samples", action="store_true", help="include per-sample records")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices")
    p.add_argument("--fsdp", type=int, default=1, help="devices the parameters are split over")
    p.add_argument("--step", type=int, help="orbax step (default: the newest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--seed", type=int, default=0, help="sampling and few-shot seed")
    return p


def run(args: argparse.Namespace) -> None:
    atomic_files.check_writable_dir(args.out)  # now, not after the evaluation
    results = evaluate(args)
    if jax.process_index() == 0:
        atomic_files.write_json(args.out, results, indent=2, ensure_ascii=False, allow_nan=False)
        for task, metrics in results["results"].items():
            shown = {k: v for k, v in metrics.items() if "," in k and "stderr" not in k}
            print(f"{task}: {json.dumps(shown)}")
        print(f"wrote {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    """Bad input (flags, a missing checkpoint, an unknown task) ends with one ``error:``
    line (:func:`oasst_jax.cli.run_main`); the results file is written whole or not at all."""
    cli.run_main(run, _parser().parse_args(argv))


if __name__ == "__main__":
    main()
