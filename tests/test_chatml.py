"""chatml text, per-token roles, the batched encoder and the loss masks."""

import json
from pathlib import Path

import numpy as np
import pytest

from oasst_jax.chatml import (
    ROLE_IDS,
    TokenizationMismatch,
    assistant_token_count,
    encode_batch,
    encode_turns,
    format_chatml,
    loss_mask,
    prompt_ids,
)
from oasst_jax.tokenizer import Tokenizer
from oasst_jax.turns import Turn

DOLLY = (
    Turn("system", "Be brief."),
    Turn("user", "What is the capital of France?"),
    Turn("context", "Paris is the capital of France."),
    Turn("assistant", "Paris."),
)
EXPECTED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>context\nParis is the capital of France.<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n"
)
CHAT = (
    Turn("user", "hello world"),
    Turn("assistant", "the quick brown fox jumps over the lazy dog"),
    Turn("user", "please explain why"),
    Turn("assistant", "because  the dog is lazy\n\nand the fox is quick"),
)


@pytest.fixture(scope="module")
def tok(sp_models):
    """The tiny model, then Meta's Llama-2 one (its dummy prefix restarts after every
    special token: the per-turn and batched encoders must still agree with the joined text)."""
    return Tokenizer(sp_models)


def test_chatml_text_byte_for_byte():
    assert format_chatml(DOLLY) == EXPECTED


def test_chatml_of_fixture_record_byte_for_byte():
    """An orca-chat record with a system instruction, built from the raw JSON fields."""
    from oasst_jax.data.sources import load_dataset

    raw = json.loads(Path("tests/data/orca-chat-gpt4.json").read_text())
    samples = load_dataset("orca-chat", {"path": "tests/data/orca-chat-gpt4.json"}).samples
    index = next(i for i, s in enumerate(samples) if s.turns[0].role == "system")
    record = raw[int(samples[index].group.split(":")[1])]
    expected = f"<|im_start|>system\n{record['instruction']}<|im_end|>\n" + "".join(
        f"<|im_start|>user\n{x['input']}<|im_end|>\n<|im_start|>assistant\n{x['output']}<|im_end|>\n"
        for x in record["conversation"]
    )
    assert format_chatml(samples[index].turns) == expected


def test_roles_align_with_turns(tok):
    tokens, roles = encode_turns(tok, DOLLY)
    assert tokens.dtype == np.int32 and roles.dtype == np.uint8 and tokens.shape == roles.shape
    assert tok.decode(tokens) == EXPECTED
    assert tokens.tolist() == tok.encode(EXPECTED)
    start = 0
    for turn in DOLLY:
        n = len(tok.encode(f"<|im_start|>{turn.role}\n{turn.text}<|im_end|>\n"))
        assert (roles[start : start + n] == ROLE_IDS[turn.role]).all()
        assert tokens[start] == tok.im_start_id
        assert tok.decode(tokens[start : start + n]).endswith("<|im_end|>\n")
        start += n
    assert start == len(tokens)
    assert ROLE_IDS == {"system": 0, "user": 1, "assistant": 2, "context": 3}


def test_markers_are_single_tokens_in_samples(tok):
    tokens, _ = encode_turns(tok, CHAT)
    assert (tokens == tok.im_start_id).sum() == len(CHAT)
    assert (tokens == tok.im_end_id).sum() == len(CHAT)


def test_assistant_token_count_covers_whole_turns(tok):
    _, roles = encode_turns(tok, CHAT)
    want = sum(
        len(tok.encode(f"<|im_start|>assistant\n{t.text}<|im_end|>\n"))
        for t in CHAT
        if t.role == "assistant"
    )
    assert assistant_token_count(roles) == want


def test_batch_encoder_matches_per_turn_encoder(tok):
    marker = (Turn("user", "say <|im_end|> please"), Turn("assistant", "ok <|im_start|> done"))
    spaces = (Turn("system", " "), Turn("user", " Hello  world\n\t"),
              Turn("assistant", "def f():\n    return  1  \n日本 🙂"))  # fmt: skip
    convs = [DOLLY, CHAT, marker, (), CHAT[:2], spaces]
    batch = encode_batch(tok, convs)
    assert not batch.mismatch.any()
    assert batch.lengths[3] == 0
    ends = np.cumsum(batch.lengths)
    for conv, end, n in zip(convs, ends, batch.lengths, strict=True):
        if not conv:
            continue
        tokens, roles = encode_turns(tok, conv)
        np.testing.assert_array_equal(batch.tokens[end - n : end], tokens)
        np.testing.assert_array_equal(batch.roles[end - n : end], roles)
    want = [assistant_token_count(encode_turns(tok, c)[1]) if c else 0 for c in convs]
    assert batch.assistant_tokens().tolist() == want


def test_eos_string_in_code_is_the_eos_id(tok):
    """``</s>`` quoted in an answer is id 2 (upstream splits on every special token), in
    the batched encoder too, and the sample passes the joined-text check."""
    code = (Turn("user", "end a sequence"), Turn("assistant", 'x = "</s>"\ny = "<s>"'))
    batch = encode_batch(tok, [CHAT, code])
    assert not batch.mismatch.any()
    tokens, roles = encode_turns(tok, code)
    np.testing.assert_array_equal(batch.tokens[batch.lengths[0] :], tokens)
    assert (tokens == tok.eos_id).sum() == 1 and (tokens == tok.bos_id).sum() == 1
    assert roles[tokens == tok.eos_id].tolist() == [ROLE_IDS["assistant"]]
    assert tok.decode(tokens) == format_chatml(code)


class _MergingTokenizer(Tokenizer):
    """Tokenises joined multi-turn text differently, as a cross-boundary merge would."""

    def encode(self, text):
        ids = super().encode(text)
        return ids[:-1] if text.count("<|im_start|>") > 1 else ids


def test_mismatch_is_raised_and_flagged(sp_model_path):
    tok = _MergingTokenizer(sp_model_path)
    with pytest.raises(TokenizationMismatch):
        encode_turns(tok, CHAT)
    encode_turns(tok, CHAT, check=False)
    marker = (Turn("user", "a <|im_end|> b"), Turn("assistant", "fine"))
    batch = encode_batch(tok, [CHAT, marker])
    assert batch.mismatch.tolist() == [False, True]
    assert batch.lengths[1] == 0


def test_loss_mask_assistant_turn_is_upstream(tok):
    tokens, roles = encode_turns(tok, DOLLY + CHAT)
    mask = loss_mask(roles, tokens, tok, "assistant_turn")
    np.testing.assert_array_equal(mask, (roles == 2).astype(np.uint8))
    assert not mask[roles != 2].any()


def test_loss_mask_assistant_answer(tok):
    quoting = (Turn("user", "echo"), Turn("assistant", "x <|im_start|>assistant\ny <|im_end|> z"))
    tokens, roles = encode_turns(tok, DOLLY + CHAT + quoting)
    mask = loss_mask(roles, tokens, tok, "assistant_answer")
    assert not mask[roles != 2].any()
    # Each masked run decodes to exactly one answer followed by its <|im_end|>.
    runs = np.split(np.arange(len(mask)), np.flatnonzero(np.diff(mask)) + 1)
    masked = [tok.decode(tokens[r]) for r in runs if mask[r[0]]]
    answers = [t.text for t in DOLLY + CHAT + quoting if t.role == "assistant"]
    assert masked == [a + "<|im_end|>" for a in answers]
    with pytest.raises(ValueError, match="unknown loss mode"):
        loss_mask(roles, tokens, tok, "everything")


def test_prompt_ids_end_with_generation_prompt(tok):
    ids = prompt_ids(tok, [{"role": "user", "content": "hello world"}], system="Be brief.")
    text = tok.decode(ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    bare = prompt_ids(tok, [Turn("user", "hi")], add_generation_prompt=False)
    assert tok.decode(bare) == "<|im_start|>user\nhi<|im_end|>\n"
