"""Hugging Face tokenizer files for an exported model, chatml chat template included.

``convert orbax-to-hf --tokenizer tokenizer.model`` calls :func:`write_hf_tokenizer` so
that every loader gives the ids training saw: ``AutoTokenizer.from_pretrained(out)``
(transformers 4 and 5), ``tokenizers.Tokenizer.from_file(out/tokenizer.json)`` (vLLM,
TGI) and :class:`~oasst_jax.tokenizer.Tokenizer` agree id for id, ``apply_chat_template(
messages, add_generation_prompt=True)`` equals ``chatml.prompt_ids``, and vLLM / TGI /
``generate`` stop at ``<|im_end|>``:

- ``tokenizer.json``: SentencePiece's BPE rebuilt in ``tokenizers`` (:func:`tokenizer_json`);
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` (the class that loads exactly
  ``tokenizer.json``), no BOS/EOS added on encode (samples start with ``<|im_start|>``),
  ``eos_token`` = ``<|im_end|>``, :data:`CHAT_TEMPLATE`;
- ``tokenizer.model``: the SentencePiece model, copied (what ``sample``/``evaluate`` and
  SentencePiece users load);
- ``special_tokens_map.json`` and ``generation_config.json`` (``eos_token_id`` =
  ``[<|im_end|>, </s>]``, the sampler's stop ids).

Why not transformers' ``LlamaTokenizer`` config: transformers 5 builds its own pipeline
from ``tokenizer.model`` and splits runs of spaces differently from SentencePiece
(``" Hello  world"``: SentencePiece ``▁Hello ▁ ▁world``, transformers 5 ``▁Hello ▁▁
world``), which is 15 of llama.cpp's 47 test strings for Llama-2 and every line of code
indented by four spaces; the ``tokenizer.json`` below is read as written by both majors.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from oasst_jax import atomic_files
from oasst_jax.tokenizer import IM_END, IM_START, Tokenizer

# chatml exactly as chatml.format_turn + the generation prompt; OA's "prompter" is a user.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'user' if message['role'] == 'prompter' else message['role'] %}"
    "{{ '" + IM_START + "' + role + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)
_PROTO = sentencepiece_model_pb2.ModelProto
# SentencePiece never makes these from text by merging (<unk>, <s>, </s>, <0x..>).
_NO_MERGE_TYPES = (_PROTO.SentencePiece.UNKNOWN, _PROTO.SentencePiece.CONTROL,
                   _PROTO.SentencePiece.BYTE)  # fmt: skip
SPACE = "\u2581"  # SentencePiece's whitespace symbol
# What write_hf_tokenizer writes.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _sp_spec(tok: Tokenizer) -> sentencepiece_model_pb2.ModelProto:
    proto = _PROTO()
    with open(tok.model_path, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(
            f"{tok.model_path}: only BPE SentencePiece models (as Llama-2's) can be exported "
            "as a Hugging Face tokenizer"
        )
    if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.remove_extra_whitespaces:
        raise ValueError(
            f"{tok.model_path}: a SentencePiece normalizer other than 'identity' without "
            "whitespace folding (as Llama-2's) has no exact tokenizer.json"
        )
    return proto


def bpe_merges(spec: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: every split of a piece into two pieces, the best
    merged piece's score first (SentencePiece merges the adjacent pair whose union scores
    highest), then longer left parts first, then by the piece's and the parts' ids; never
    into or out of ``<unk>``, control or byte pieces, which SentencePiece does not merge.

    Written here because the same rule in transformers (``convert_slow_tokenizer.
    generate_merges``, the order tests check this against) would make transformers a
    dependency of every export."""
    ids = {p.piece: i for i, p in enumerate(spec.pieces) if p.type not in _NO_MERGE_TYPES}
    ranked = [
        (-p.score, -k, k - len(p.piece), ids[p.piece], ids[p.piece[:k]], ids[p.piece[k:]])
        for p in spec.pieces
        if p.piece in ids
        for k in range(1, len(p.piece))
        if p.piece[:k] in ids and p.piece[k:] in ids
    ]
    pieces = [p.piece for p in spec.pieces]
    return [(pieces[left], pieces[right]) for *_, left, right in sorted(ranked)]


def tokenizer_json(tok: Tokenizer) -> str:
    """``tokenizer.json`` that tokenizes as ``tok`` (the JSON text).

    SentencePiece BPE, rebuilt from the ``tokenizers`` library's parts:

    - the special tokens (:meth:`Tokenizer.special_tokens`: the extra ids, ``<s>``,
      ``</s>``) as added tokens, so text is split on them first and each piece between
      them is tokenized on its own, as :meth:`Tokenizer.encode` does (``<unk>`` is not
      one: SentencePiece reads that text as text);
    - normalizer: spaces to ``▁``, and a ``▁`` prepended to every piece when the model has
      ``add_dummy_prefix`` (Llama-2 does), nothing else (identity normalisation, runs of
      spaces kept); no pre-tokenizer, as SentencePiece encodes a piece whole;
    - model: BPE over the same vocabulary with byte fallback and the merges of
      :func:`bpe_merges`;
    - decoder: bytes, then the dummy ``▁`` dropped at the start and after each special
      token (SentencePiece decodes each piece between special tokens on its own), then
      ``▁`` to spaces, so decoding gives the text back.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    spec = _sp_spec(tok)
    vocab = {p.piece: i for i, p in enumerate(spec.pieces)}
    merges = bpe_merges(spec)
    unk = spec.pieces[spec.trainer_spec.unk_id].piece
    hf = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    spaces = [normalizers.Replace(" ", SPACE)]
    if spec.normalizer_spec.add_dummy_prefix:
        spaces.insert(0, normalizers.Prepend(SPACE))
    hf.normalizer = normalizers.Sequence(spaces)
    special = list(tok.special_tokens())
    steps = [decoders.ByteFallback(), decoders.Fuse()]
    if spec.normalizer_spec.add_dummy_prefix:
        after = "|".join(re.escape(t) for t in special)
        steps.append(decoders.Replace(Regex(f"(?<={after}){SPACE}"), ""))
    steps.append(decoders.Replace(SPACE, " "))
    if spec.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(steps)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return hf.to_str()


def _added(content: str) -> dict[str, Any]:
    flags = dict(lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
    return {"content": content, **flags}


def tokenizer_config(tok: Tokenizer, model_max_length: int = 4096) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``tok`` (its special tokens as added tokens).

    No ``unk_token``: transformers would add it as a special token and split ``<unk>`` out
    of text, which SentencePiece (and training) reads as text."""
    added = {str(i): _added(t) for t, i in sorted(tok.special_tokens().items(), key=_by_id)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": tok.decode([tok.bos_id]),
        "eos_token": IM_END,
        "pad_token": None,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(tok.extra_ids),
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def _by_id(item: tuple[str, int]) -> int:
    return item[1]


def write_hf_tokenizer(tok: Tokenizer, out: str, model_max_length: int = 4096) -> list[str]:
    """Write the tokenizer files + ``generation_config.json``; returns their names.

    Each file is written under a temporary name and renamed (``oasst_jax.atomic_files``),
    so an existing file is replaced whole or left as it was.
    """
    os.makedirs(out, exist_ok=True)
    config = tokenizer_config(tok, model_max_length)
    text = tokenizer_json(tok)
    with atomic_files.atomic_path(os.path.join(out, "tokenizer.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    with atomic_files.atomic_path(os.path.join(out, "tokenizer.model")) as tmp:
        shutil.copyfile(tok.model_path, tmp)
    jsons = {
        "tokenizer_config.json": config,
        "special_tokens_map.json": {
            "bos_token": config["bos_token"],
            "eos_token": config["eos_token"],
            "additional_special_tokens": config["additional_special_tokens"],
        },
        "generation_config.json": {
            "bos_token_id": tok.bos_id,
            "eos_token_id": [tok.im_end_id, tok.eos_id],
        },
    }
    for name, obj in jsons.items():
        atomic_files.write_json(os.path.join(out, name), obj, indent=2, ensure_ascii=False)
    return ["tokenizer.json", "tokenizer.model", *jsons]
