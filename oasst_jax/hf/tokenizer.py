"""Hugging Face tokenizer files for an exported model, chatml chat template included.

``convert orbax-to-hf --tokenizer tokenizer.model`` calls :func:`write_hf_tokenizer`
so ``AutoTokenizer.from_pretrained(out).apply_chat_template(messages,
add_generation_prompt=True)`` gives exactly the ids of ``chatml.prompt_ids`` (the
training format), and vLLM / TGI / ``generate`` stop at ``<|im_end|>``:

- ``tokenizer.model``: the SentencePiece model, copied;
- ``tokenizer_config.json``: ``LlamaTokenizer`` with the extra ids (the two chatml
  markers, plus Megatron's five when the model has them) as added special tokens,
  no BOS/EOS added on encode (samples start with ``<|im_start|>``), ``eos_token``
  = ``<|im_end|>`` and :data:`CHAT_TEMPLATE`;
- ``special_tokens_map.json`` and ``generation_config.json`` (``eos_token_id`` =
  ``[<|im_end|>, </s>]``, the sampler's stop ids).

Why ``add_prefix_space`` and ``legacy``: :class:`~oasst_jax.tokenizer.Tokenizer`
SentencePiece-encodes each piece between markers on its own, so a piece gets the
model's dummy ``▁`` prefix exactly when the model has ``add_dummy_prefix`` (Llama-2:
yes; the demo's tokenizer: no).  transformers' ``LlamaTokenizer`` does the same with
``add_prefix_space`` = that flag and ``legacy=True`` (prefix after every special token).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from oasst_jax import files
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
# What write_hf_tokenizer writes.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _sp_spec(model_path: str) -> sentencepiece_model_pb2.ModelProto:
    proto = _PROTO()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _added(content: str) -> dict[str, Any]:
    flags = dict(lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
    return {"content": content, **flags}


def tokenizer_config(tok: Tokenizer, model_max_length: int = 4096) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``tok`` (its extra-id layout as added tokens)."""
    spec = _sp_spec(tok.model_path)
    if spec.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(
            f"{tok.model_path}: only BPE SentencePiece models (as Llama-2's) can be exported "
            "as a transformers LlamaTokenizer"
        )
    kinds = (_PROTO.SentencePiece.UNKNOWN, _PROTO.SentencePiece.CONTROL)  # <unk> <s> </s>
    added = {str(i): _added(p.piece) for i, p in enumerate(spec.pieces) if p.type in kinds}
    added.update({str(i): _added(t) for t, i in tok.extra_ids.items()})
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": spec.normalizer_spec.add_dummy_prefix,
        "legacy": True,
        "bos_token": spec.pieces[tok.bos_id].piece,
        "eos_token": IM_END,
        "unk_token": spec.pieces[spec.trainer_spec.unk_id].piece,
        "pad_token": None,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(tok.extra_ids),
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def write_hf_tokenizer(tok: Tokenizer, out: str, model_max_length: int = 4096) -> list[str]:
    """Write the tokenizer files + ``generation_config.json``; returns their names.

    Each file is written under a temporary name and renamed (``oasst_jax.files``),
    so an existing file is replaced whole or left as it was.
    """
    os.makedirs(out, exist_ok=True)
    config = tokenizer_config(tok, model_max_length)
    with files.atomic_path(os.path.join(out, "tokenizer.model")) as tmp:
        shutil.copyfile(tok.model_path, tmp)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}
    jsons = {
        "tokenizer_config.json": config,
        "special_tokens_map.json": {
            **special,
            "additional_special_tokens": config["additional_special_tokens"],
        },
        "generation_config.json": {
            "bos_token_id": tok.bos_id,
            "eos_token_id": [tok.im_end_id, tok.eos_id],
        },
    }
    for name, obj in jsons.items():
        files.write_json(os.path.join(out, name), obj, indent=2, ensure_ascii=False)
    return ["tokenizer.model", *jsons]
