"""Hugging Face ``LlamaForCausalLM`` <-> orbax weights, without torch and without pickle.

    python -m oasst_jax.convert hf-to-orbax --hf-dir DIR|HUB_ID --out CKPT [--add-chatml-tokens
        [--megatron-new-tokens]]
    python -m oasst_jax.convert orbax-to-hf --ckpt CKPT --out DIR [--max-shard-size 5GB]
        [--tokenizer tokenizer.model]
    python -m oasst_jax.convert lora-to-peft --ckpt RUN/checkpoints --out DIR
        [--merge --base BASE_CKPT [--dtype bfloat16] [--tokenizer tokenizer.model]]
    python -m oasst_jax.convert rm-to-hf --ckpt RUN/checkpoints --out DIR
        [--tokenizer tokenizer.model] [--pad-token-id 0] [--dtype bfloat16]

Import reads ``config.json`` and ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``; ``.bin``/``.pt`` files are refused because loading
them means unpickling.  Neither direction needs RAM for the whole fp32 model, and HF ->
orbax -> HF gives the same tensors bit for bit (``oasst_jax.hf.convert``; the layouts
are in ``oasst_jax.hf.layout``).

Failures: a damaged input (a config.json field missing or mistyped, a
truncated safetensors file, an index entry naming a file outside the model
directory) is one ``ValueError`` line naming the file and the field or tensor,
and the CLI exits 1 with it.  Export builds the output directory under a hidden
name beside ``--out`` and renames it into place when complete, so a failed
export leaves an existing ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from oasst_jax import cli, weights
from oasst_jax.hf.config import CONFIG_FILE, DTYPES
from oasst_jax.hf.convert import hf_to_orbax, orbax_to_hf
from oasst_jax.hf.peft import lora_merged_to_hf, lora_to_peft
from oasst_jax.hf.reward import reward_to_hf


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m oasst_jax.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-orbax", help="Hugging Face safetensors -> orbax checkpoint")
    imp.add_argument(
        "--hf-dir",
        required=True,
        help="directory with config.json + safetensors, or a hub id (meta-llama/Llama-2-70b-hf)",
    )
    imp.add_argument("--out", required=True, help="new orbax checkpoint directory")
    imp.add_argument(
        "--add-chatml-tokens",
        action="store_true",
        help="append <|im_start|>, <|im_end|> rows (mean-initialised) to embedding and LM head",
    )
    imp.add_argument(
        "--megatron-new-tokens",
        action="store_true",
        help="with --add-chatml-tokens: first Megatron-LLM's <CLS> <SEP> <EOD> <MASK> <PAD> rows "
        "(the card's 32007-token layout, <|im_start|> = 32005)",
    )
    exp = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> Hugging Face safetensors")
    exp.add_argument("--ckpt", required=True, help="orbax checkpoint directory (latest step)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB)")
    exp.add_argument("--dtype", choices=DTYPES, help="default: the imported model's dtype")
    exp.add_argument(
        "--tokenizer", help="SentencePiece model: also write tokenizer files + chat template"
    )
    lp = sub.add_parser(
        "lora-to-peft",
        help="a LoRA run's adapters -> PEFT adapter dir (or, with --merge, a merged HF model)",
    )
    lp.add_argument("--ckpt", required=True, help="the LoRA run's checkpoints (latest step)")
    lp.add_argument("--out", required=True, help="output directory")
    lp.add_argument("--merge", action="store_true", help="write base + adapters as a full HF model")
    lp.add_argument("--base", help="with --merge: the base's orbax checkpoint (the run's load=)")
    lp.add_argument("--max-shard-size", default="5GB", help="with --merge: largest file (5GB)")
    lp.add_argument("--dtype", choices=DTYPES, help="with --merge: default the base's dtype")
    lp.add_argument("--tokenizer", help="with --merge: SentencePiece model for tokenizer files")
    rm = sub.add_parser(
        "rm-to-hf", help="a reward-model run's checkpoint -> HF LlamaForSequenceClassification"
    )
    rm.add_argument("--ckpt", required=True, help="the rm run's checkpoints (latest step)")
    rm.add_argument("--out", required=True, help="output directory")
    rm.add_argument(
        "--pad-token-id",
        type=int,
        default=0,
        help="config.json pad_token_id: HF scores the last token that is not it (0, <unk>)",
    )
    rm.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB)")
    rm.add_argument("--dtype", choices=DTYPES, help="default: the imported model's, else bf16")
    rm.add_argument("--tokenizer", help="SentencePiece model: also write tokenizer files")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Bad input (a damaged HF directory or checkpoint, an occupied --out) ends with one
    ``error:`` line (:func:`oasst_jax.cli.run_main`); nothing at --out is changed."""
    cli.run_main(_convert, _parser().parse_args(argv))


def _convert(args: argparse.Namespace) -> None:
    if args.command == "hf-to-orbax":
        if args.megatron_new_tokens and not args.add_chatml_tokens:
            raise ValueError("--megatron-new-tokens goes with --add-chatml-tokens")
        hf_dir = weights.resolve(args.hf_dir, "--hf-dir")
        cfg = hf_to_orbax(
            hf_dir,
            args.out,
            add_chatml_tokens=args.add_chatml_tokens,
            megatron_new_tokens=args.megatron_new_tokens,
        )
        print(
            f"wrote {args.out}: {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size} "
            f"(padded {cfg.padded_vocab_size}), {cfg.num_params():,} params"
        )
    elif args.command == "lora-to-peft":
        _lora_to_peft(args)
    elif args.command == "rm-to-hf":
        written = reward_to_hf(
            args.ckpt,
            args.out,
            pad_token_id=args.pad_token_id,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
        )
        print(f"wrote {args.out}: reward model, {CONFIG_FILE} + {len(written)} safetensors file(s)")
    else:
        written = orbax_to_hf(
            args.ckpt,
            args.out,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
        )
        extra = " + tokenizer files" if args.tokenizer else _kept_tokenizer(args.out)
        print(f"wrote {args.out}: {CONFIG_FILE} + {len(written)} safetensors file(s){extra}")


def _kept_tokenizer(out: str) -> str:
    """What an export without ``--tokenizer`` holds of a tokenizer: the files of the export
    it replaced (``hf.convert.write_tokenizer_files``), or none."""
    if os.path.isfile(os.path.join(out, "tokenizer.model")):
        return " (no --tokenizer: kept the tokenizer files already there)"
    return " (no --tokenizer: no tokenizer files)"


def _lora_to_peft(args: argparse.Namespace) -> None:
    if not args.merge:
        if args.base:
            raise ValueError("--base is for --merge; a PEFT adapter needs no base")
        lora_to_peft(args.ckpt, args.out)
        print(f"wrote {args.out}: PEFT adapter (adapter_config.json, adapter_model.safetensors)")
        return
    if not args.base:
        raise ValueError("--merge needs --base (the orbax checkpoint the run loaded)")
    written = lora_merged_to_hf(
        args.ckpt,
        args.base,
        args.out,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
    )
    print(f"wrote {args.out}: merged model, {CONFIG_FILE} + {len(written)} safetensors file(s)")


if __name__ == "__main__":
    main()
