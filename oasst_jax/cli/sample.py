"""Talk to a checkpoint: one-shot prompts, interactive chat, JSON lines, sampling reports.

    python -m oasst_jax.sample --ckpt CKPT_OR_HF_DIR --tokenizer tokenizer.model --prompt "Hi"
    python -m oasst_jax.sample --ckpt ... --chat
    python -m oasst_jax.sample --ckpt ... --prompt "Hi" --prompt "2+2?" --json
    python -m oasst_jax.sample --ckpt ... --prompts prompts.jsonl --out report.json
    python -m oasst_jax.sample compare a.json b.json ... --out report_page.html

Every prompt is a user turn formatted in chatml (``chatml.prompt_ids``), after a
system turn that defaults to the model card's recommended Llama-2 system prompt
(``--system ''`` leaves it out), ending with ``<|im_start|>assistant\\n``.
Decoding stops at ``<|im_end|>`` or EOS (``oasst_jax.decode``).  ``--temperature
0`` is greedy.  ``--ckpt`` is an orbax checkpoint root (newest step, or
``--step``) or a Hugging Face directory (``config.json`` + safetensors).

``--json`` prints one line per prompt: ``{"prompt", "prompt_ids", "output_ids",
"text"}``; ``prompt_ids`` is the full chatml prompt as fed to the model and
``output_ids`` excludes the stop token.

Sampling report (``--prompts FILE --out report.json``), the schema of
Open-Assistant's ``oasst-model-eval`` sampling reports plus timing fields, so
reports of two checkpoints line up prompt by prompt::

    {"model_name": str, "date": ISO-8601 str,
     "args": {"ckpt", "tokenizer", "system", "seed", "num_samples", "max_new_tokens", ...},
     "tokens_per_second": float,                  # all prompts, compilation excluded
     "prompts": [{"prompt": str,
                  "results": [{"sampling_config": str,      # e.g. "greedy", "t0.7_p0.9"
                               "sampling_params": {"max_new_tokens", "temperature", "top_k",
                                                   "top_p", "repetition_penalty"},
                               "outputs": [str, ...],        # --num-samples of them
                               "output_ids": [[int, ...], ...],
                               "tokens_per_second": float}]}]}  # of the batch it ran in

``FILE`` holds one prompt per line: a JSON string or an object with ``"prompt"``
(Open-Assistant's ``prompt_lottery`` files are such lines).

``compare`` (a first argument, before any flag) puts sampling reports side by side in
one self-contained HTML page: prompts as rows, reports as columns, a select element
for the sampling config (``oasst_jax.report_page``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from oasst_jax import atomic_files, cli, decode, report_page, sharding, weights
from oasst_jax.chatml import format_turn, prompt_ids
from oasst_jax.model import LlamaConfig
from oasst_jax.tokenizer import IM_END, IM_START, Tokenizer, model_dir_tokenizer

# The model card's recommended inference system prompt.
SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe. Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses "
    "are socially unbiased and positive in nature.\nIf a question does not make any sense, or "
    "is not factually coherent, explain why instead of answering something not correct. If "
    "you don't know the answer to a question, please don't share false information."
)


def stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    return (tok.im_end_id, tok.eos_id)


def check_fits(ids: Sequence[int], cfg: LlamaConfig, what: str, system: str) -> None:
    """One-line error when ``ids`` leave no room to generate in the context window."""
    if len(ids) >= cfg.max_position_embeddings:
        hint = " (system prompt included; --system '' leaves it out)" if system else ""
        raise ValueError(
            f"{what} is {len(ids)} tokens as a chatml prompt{hint}; the context window "
            f"(max_position_embeddings) is {cfg.max_position_embeddings}, leaving no room "
            "to generate"
        )


def _preview(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def config_name(sp: decode.SamplingParams) -> str:
    if sp.temperature == 0:
        return "greedy"
    parts = [f"t{sp.temperature:g}"]
    parts += [f"k{sp.top_k}"] if sp.top_k else []
    parts += [f"p{sp.top_p:g}"] if sp.top_p < 1 else []
    parts += [f"r{sp.repetition_penalty:g}"] if sp.repetition_penalty != 1 else []
    return "_".join(parts)


def incremental_text(tok: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as ids arrive: decode the whole prefix, emit what is new.

    Holds back while the tail is an incomplete UTF-8 sequence (byte-fallback pieces).
    """
    seen: list[int] = []
    shown = ""
    for i in ids:
        seen.append(i)
        text = tok.decode(seen)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown) :]
        shown = text


def _ids(args, tok: Tokenizer, prompt: str) -> list[int]:
    return prompt_ids(tok, [{"role": "user", "content": prompt}], args.system)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_json(args, params, cfg, tok, mesh, sp, prompts: Sequence[str]) -> None:
    for batch in _batches(prompts, args.batch_size):
        ids = [_ids(args, tok, p) for p in batch]
        gen = decode.generate(params, cfg, ids, sp, stop_ids(tok), seed=args.seed, mesh=mesh)
        for prompt, pids, out in zip(batch, ids, gen.ids, strict=True):
            _window_notes(cfg, sp, ids, [out], f"the reply to {_preview(prompt)}")
            line = {"prompt": prompt, "prompt_ids": pids, "output_ids": out}
            print(json.dumps({**line, "text": tok.decode(out)}, ensure_ascii=False), flush=True)


def run_name(path: str) -> str:
    """What a checkpoint is called in a report: its folder, or for a run's ``checkpoints``
    root (or a step inside it) the run's folder, which every run's root shares."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-1].isdigit() and len(parts) > 1 and parts[-2] == "checkpoints":
        parts = parts[:-1]
    if parts[-1] == "checkpoints" and len(parts) > 1:
        return parts[-2]
    return parts[-1]


def report_name(ckpt: str, adapter: str | None) -> str:
    """A report's default ``model_name``: the run (``run_name``), with ``+ adapter run``
    when sampled with ``--adapter``, so reports of one base with and without adapters (or
    with two) get different columns in ``sample compare``."""
    return run_name(ckpt) + (f" + {run_name(adapter)}" if adapter else "")


def window_note(what: str, got: int, room: int, sp: decode.SamplingParams, window: int) -> None:
    """One stderr note when a reply stopped at the context window rather than at a stop
    token or ``--max-new-tokens``: ``got`` new tokens, ``room`` what the window left after
    the prompt (in a batch, after its longest prompt: decoding stops there for all)."""
    if room < sp.max_new_tokens and got >= room:
        _note(
            f"{what} stopped at the context window (max_position_embeddings {window}) after "
            f"{got} new tokens; --max-new-tokens asked {sp.max_new_tokens}"
        )


def build_report(args, params, cfg, tok, mesh, sp, prompts: Sequence[str]) -> dict:
    """The sampling report (schema in the module docstring)."""
    rows = [p for p in prompts for _ in range(args.num_samples)]
    results, tokens, seconds = [], 0, 0.0
    for batch in _batches(rows, args.batch_size):
        ids = [_ids(args, tok, p) for p in batch]
        seed = args.seed + len(results)
        gen = decode.generate(params, cfg, ids, sp, stop_ids(tok), seed=seed, mesh=mesh)
        for p, out in zip(batch, gen.ids, strict=True):
            _window_notes(cfg, sp, ids, [out], f"a reply to {_preview(p)}")
        results += [(out, gen.tokens_per_second) for out in gen.ids]
        tokens, seconds = tokens + sum(len(o) for o in gen.ids), seconds + gen.seconds
    params_json = dataclasses.asdict(sp)
    entries = []
    for n, prompt in enumerate(prompts):
        mine = results[n * args.num_samples : (n + 1) * args.num_samples]
        result = {
            "sampling_config": config_name(sp),
            "sampling_params": params_json,
            "outputs": [tok.decode(out) for out, _ in mine],
            "output_ids": [out for out, _ in mine],
            "tokens_per_second": float(np.mean([tps for _, tps in mine])),
        }
        entries.append({"prompt": prompt, "results": [result]})
    run_args = {k: v for k, v in vars(args).items() if k not in ("prompt", "out", "json", "chat")}
    return {
        "model_name": args.model_name or report_name(args.ckpt, args.adapter),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": run_args,
        "tokens_per_second": tokens / max(seconds, 1e-9),
        "prompts": entries,
    }


def _print_reply(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Stream a reply's text to stdout as its ids decode; return the text."""
    pieces = []
    for piece in incremental_text(tok, ids):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def reply(args, params, cfg, tok, mesh, sp, prompt: str) -> str:
    """Stream one assistant reply to a one-shot prompt to stdout and return its text."""
    ids = _ids(args, tok, prompt)
    check_fits(ids, cfg, "the prompt", args.system)
    stream = decode.stream(params, cfg, ids, sp, stop_ids(tok), seed=args.seed, mesh=mesh)
    out: list[int] = []
    text = _print_reply(tok, _kept(stream, out))
    _window_notes(cfg, sp, [ids], [out], "the reply")
    return text


def _kept(ids: Iterable[int], into: list[int]) -> Iterator[int]:
    """``ids`` passed on as they come, each also appended to ``into``."""
    for i in ids:
        into.append(i)
        yield i


def _window_notes(cfg, sp, prompts: Sequence[Sequence[int]], outs, what: str) -> None:
    """:func:`window_note` for replies decoded together with ``prompts``."""
    room = cfg.max_position_embeddings - max(len(p) for p in prompts)
    for out in outs:
        window_note(what, len(out), room, sp, cfg.max_position_embeddings)


def next_turn_ids(tok: Tokenizer, text: str) -> list[int]:
    """The ids a chat turn adds after the model's reply: the reply's closing
    ``<|im_end|>\\n``, the user turn and the next assistant header.  Equal to the tail
    of ``prompt_ids`` over the whole history, since the tokenizer splits at special tokens."""
    return tok.encode(f"{IM_END}\n{format_turn('user', text)}{IM_START}assistant\n")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def chat(args, params, cfg, tok, mesh, sp) -> None:
    """Multi-turn chat on stdin.  The KV cache is kept across turns (``decode.Chat``), so
    a turn prefills only its own ids, not the whole history again."""
    conversation = decode.Chat(
        params, cfg, sp, stop_ids(tok), seed=args.seed, mesh=mesh, note=_note
    )
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("user> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not text.strip():
            return
        if conversation.history:
            ids, what = next_turn_ids(tok, text), "the conversation"
        else:
            ids, what = _ids(args, tok, text), "the prompt"
        check_fits(conversation.history + ids, cfg, what, args.system)
        prompt = conversation.history + ids
        print("assistant> ", end="", flush=True)
        out: list[int] = []
        _print_reply(tok, _kept(conversation.turn(ids), out))
        _window_notes(cfg, sp, [prompt], [out], "the reply")


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m oasst_jax.sample",
        description=__doc__.split("\n")[0],
        epilog="python -m oasst_jax.sample compare REPORT.json ... --out PAGE.html puts "
        "sampling reports side by side (compare --help)",
    )
    p.add_model_arguments()
    p.add_argument("--step", type=int, help="orbax step (default: the newest)")
    p.add_argument("--adapter", help="a LoRA run's checkpoint root: its adapters merged in")
    p.add_argument(
        "--system", default=SYSTEM_PROMPT, help="system prompt ('' = none; default: the card's)"
    )
    p.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    p.add_argument("--prompts", help="JSON-lines file of prompts (strings or {'prompt': ...})")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("--out", help="write a sampling report (JSON) here")
    p.add_argument("--model-name", help="report's model_name (default: the checkpoint's folder)")
    p.add_argument("--num-samples", type=int, default=1, help="report outputs per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.9, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel devices")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    return p


def check_args(args: argparse.Namespace, prompts: Sequence[str]) -> None:
    """One-line errors for contradictory or out-of-range flags, before anything loads."""
    modes = [flag for flag, on in (("--chat", args.chat), ("--json", args.json)) if on]
    modes += ["--out"] if args.out else []
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are alternatives; give one")
    if args.chat and prompts:
        raise ValueError("--chat reads prompts from stdin; drop --prompt/--prompts")
    if not args.chat and not prompts:
        raise ValueError("give --prompt, --prompts or --chat")
    for flag in ("num_samples", "batch_size", "tensor"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tensor > jax.device_count():
        raise ValueError(f"--tensor {args.tensor} but only {jax.device_count()} devices")


def run(args: argparse.Namespace) -> None:
    prompts = list(args.prompt) + (decode.read_prompts(args.prompts) if args.prompts else [])
    check_args(args, prompts)
    if args.out:
        atomic_files.check_writable_dir(args.out)  # now, not after generating
    sp = decode.SamplingParams(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty
    )
    mesh = sharding.make_mesh({sharding.TENSOR: args.tensor}, jax.devices()[: args.tensor])
    params, cfg = weights.load_for_inference(
        args.ckpt, mesh, step=args.step, dtype=args.dtype, adapter=args.adapter, where="--ckpt"
    )
    tok = model_dir_tokenizer(args.ckpt, cfg.vocab_size, args.tokenizer)
    for n, prompt in enumerate(prompts):
        what = f"prompt {n + 1} ({_preview(prompt)})"
        check_fits(_ids(args, tok, prompt), cfg, what, args.system)
    loaded = (params, cfg, tok, mesh, sp)
    if args.chat:
        chat(args, *loaded)
    elif args.out:
        report = build_report(args, *loaded, prompts)
        atomic_files.write_json(args.out, report, indent=2, ensure_ascii=False)
        print(f"wrote {args.out}: {len(prompts)} prompts")
    elif args.json:
        run_json(args, *loaded, prompts)
    else:
        for prompt in prompts:
            reply(args, *loaded, prompt)


def _compare_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m oasst_jax.sample compare",
        description="Sampling reports side by side in one self-contained HTML page.",
    )
    p.add_argument("reports", nargs="+", help="sampling reports (sample --out) to compare")
    p.add_argument("--out", required=True, help="the HTML page to write")
    p.add_argument("--title", default="", help="page title (default: the reports' model names)")
    return p


def run_compare(args: argparse.Namespace) -> None:
    """Read and check every report before writing, then write the page atomically."""
    atomic_files.check_writable_dir(args.out)
    reports = [(path, report_page.load_report(path)) for path in args.reports]
    page = report_page.render(reports, args.title)
    with atomic_files.atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {args.out}: {len(reports)} reports")


def main(argv: Sequence[str] | None = None) -> None:
    """Bad input (flags, files, a checkpoint that does not load, a prompt longer than
    the context window, a file that is not a report) ends with one ``error:`` line
    (:func:`oasst_jax.cli.run_main`); the report or page is written whole or not at all."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        cli.run_main(run_compare, _compare_parser().parse_args(argv[1:]))
    else:
        cli.run_main(run, _parser().parse_args(argv))


if __name__ == "__main__":
    main()
