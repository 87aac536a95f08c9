"""chatml formatting, per-token role ids and the loss mask.

A sample is written as (one block per turn, the last one included)::

    <|im_start|>{role}\\n{text}<|im_end|>\\n

Each turn is tokenised on its own and every token of the turn gets that turn's role id
(``ROLES``: system 0, user 1, assistant 2, context 3), as upstream's ``pretokenize.py``.
Upstream then checks that tokenising the joined text gives the same ids (a SentencePiece
merge across a turn boundary would desynchronise roles and tokens); :func:`encode_turns`
does the same and raises :class:`TokenizationMismatch`, which the pretokenizer counts as a
skip reason.

What the loss covers (see :func:`loss_mask`), never system, user or context tokens:

- ``assistant_turn`` (default, = Megatron-LLM training on ``role == assistant``): every
  token of an assistant turn: the ``<|im_start|>assistant\\n`` header, the answer, the
  closing ``<|im_end|>`` and the trailing newline;
- ``assistant_answer``: only the answer tokens and the closing ``<|im_end|>`` (the header
  and the trailing newline are excluded).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from oasst_jax.tokenizer import IM_END, IM_START, Tokenizer
from oasst_jax.turns import LOSS_MODES, ROLES, Turn

ROLE_IDS: dict[str, int] = {r: i for i, r in enumerate(ROLES)}
ASSISTANT = ROLE_IDS["assistant"]


class TokenizationMismatch(ValueError):
    """Tokenising the joined chatml text differs from concatenating the per-turn tokens."""


def format_turn(role: str, text: str) -> str:
    """One chatml block, trailing newline included."""
    return f"{IM_START}{role}\n{text}{IM_END}\n"


def format_chatml(turns: Sequence[Turn]) -> str:
    """The full chatml text of a conversation (no BOS, ends with ``<|im_end|>\\n``)."""
    return "".join(format_turn(t.role, t.text) for t in turns)


def encode_turns(
    tokenizer: Tokenizer, turns: Sequence[Turn], *, check: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and the aligned role ids (uint8) of a conversation.

    Raises :class:`TokenizationMismatch` when ``check`` and the joined text tokenises
    differently from the concatenated turns.
    """
    pieces = [tokenizer.encode(format_turn(t.role, t.text)) for t in turns]
    tokens = np.fromiter((i for p in pieces for i in p), dtype=np.int32)
    roles = np.repeat(
        np.array([ROLE_IDS[t.role] for t in turns], dtype=np.uint8),
        [len(p) for p in pieces],
    )
    if check and tokenizer.encode(format_chatml(turns)) != tokens.tolist():
        raise TokenizationMismatch("joined chatml text tokenises differently from its turns")
    return tokens, roles


@dataclass
class EncodedBatch:
    """Many conversations encoded back to back (what a pretokenizer worker returns).

    A conversation whose check failed has length 0 and ``mismatch`` set.
    """

    tokens: np.ndarray  # int32[sum(lengths)]
    roles: np.ndarray  # uint8[sum(lengths)]
    lengths: np.ndarray  # int64[n]
    mismatch: np.ndarray  # bool[n]

    def assistant_tokens(self) -> np.ndarray:
        """Per-conversation :func:`assistant_token_count` (int64[n])."""
        cum = np.concatenate([[0], np.cumsum(self.roles == ASSISTANT, dtype=np.int64)])
        ends = np.cumsum(self.lengths)
        return cum[ends] - cum[ends - self.lengths]


def encode_batch(
    tokenizer: Tokenizer, conversations: Sequence[Sequence[Turn]], *, check: bool = True
) -> EncodedBatch:
    """:func:`encode_turns` for many conversations, with one batched SentencePiece call.

    Why it is exact: a turn is ``<|im_start|>`` + ``{role}\\n{text}`` + ``<|im_end|>`` +
    ``\\n``, and :meth:`Tokenizer.encode` splits on the special tokens, so when no text
    contains a special-token string (a marker, ``<s>``, ``</s>``, ...) the turn's ids are
    ``[im_start] + sp(role\\ntext) + [im_end] + sp(\\n)``.  The joined text then splits into
    exactly the same pieces (no special token can straddle a turn boundary: none has ``<``
    past its first character or contains a newline), so upstream's check holds by
    construction and is only run for the rare conversations whose text contains a special
    token, which take the :func:`encode_turns` path.
    """
    plain = [not any(tokenizer.has_special_tokens(t.text) for t in c) for c in conversations]
    bodies = [
        f"{t.role}\n{t.text}" for c, ok in zip(conversations, plain, strict=True) if ok for t in c
    ]
    body_ids = iter(tokenizer.encode_plain(bodies))
    head = [tokenizer.im_start_id]
    tail = [tokenizer.im_end_id, *tokenizer.encode("\n")]
    tokens = array("i")
    run_roles: list[int] = []
    run_lens: list[int] = []
    lengths: list[int] = []
    mismatch: list[bool] = []
    for turns, ok in zip(conversations, plain, strict=True):
        start, failed = len(tokens), False
        if ok:
            for t in turns:
                ids = next(body_ids)
                tokens.extend(head)
                tokens.extend(ids)
                tokens.extend(tail)
                run_roles.append(ROLE_IDS[t.role])
                run_lens.append(len(ids) + len(head) + len(tail))
        else:
            try:
                ids, roles = encode_turns(tokenizer, turns, check=check)
            except TokenizationMismatch:
                ids, roles, failed = np.zeros(0, np.int32), np.zeros(0, np.uint8), True
            tokens.extend(ids.tolist())
            run_roles.extend(roles.tolist())
            run_lens.extend([1] * len(roles))
        lengths.append(len(tokens) - start)
        mismatch.append(failed)
    return EncodedBatch(
        tokens=np.frombuffer(tokens, dtype=np.int32),
        roles=np.repeat(np.array(run_roles, dtype=np.uint8), run_lens),
        lengths=np.array(lengths, dtype=np.int64),
        mismatch=np.array(mismatch, dtype=bool),
    )


def assistant_token_count(roles: np.ndarray) -> int:
    """Tokens of the assistant turns (header, text, ``<|im_end|>``, newline).

    This is what ``min_assistant_tokens`` is compared with, as upstream.
    """
    return int(np.count_nonzero(np.asarray(roles) == ASSISTANT))


def loss_mask(
    roles: np.ndarray, tokens: np.ndarray, tokenizer: Tokenizer | None, mode: str
) -> np.ndarray:
    """Per-token 0/1 mask (uint8) of the tokens the loss is computed on (module docstring).

    ``assistant_turn`` needs only the roles; ``assistant_answer`` needs the tokenizer.

    For ``assistant_answer``, the header of each assistant turn is the shortest token prefix
    that decodes to ``<|im_start|>assistant\\n`` (so a tokenizer that merges the newline
    into the answer's first token loses that token from the loss rather than training on
    the header), and the tokens after the turn's ``<|im_end|>`` are the trailing newline.
    """
    roles = np.asarray(roles)
    tokens = np.asarray(tokens)
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    if mode == "assistant_answer" and tokenizer is None:
        raise ValueError("loss mode 'assistant_answer' needs the tokenizer")
    mask = roles == ASSISTANT
    if mode == "assistant_answer":
        for start, end in _assistant_turns(roles):
            turn = tokens[start:end]
            mask[start : start + _header_len(tokenizer, turn)] = False
            closes = np.flatnonzero(turn == tokenizer.im_end_id)
            if closes.size:
                mask[start + closes[-1] + 1 : end] = False
    return mask.astype(np.uint8)


def _assistant_turns(roles: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of assistant tokens, i.e. of each assistant turn.

    Role runs rather than ``<|im_start|>`` ids delimit turns, so a marker quoted inside an
    answer does not split it; conversations never hold two assistant turns in a row.
    """
    n = len(roles)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = roles[1:] != roles[:-1]
    bounds = np.append(np.flatnonzero(new_run), n)
    return [
        (int(s), int(e))
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        if roles[s] == ASSISTANT
    ]


def _header_len(tokenizer: Tokenizer, turn: np.ndarray) -> int:
    header = f"{IM_START}assistant\n"
    for k in range(1, len(turn) + 1):
        if tokenizer.decode(turn[:k]).startswith(header):
            return k
    return len(turn)


def prompt_ids(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]] | Sequence[Turn],
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a chat prompt for inference, ending with ``<|im_start|>assistant\\n``.

    ``messages`` are ``{"role", "content"}`` dicts (OpenAI style; ``prompter`` is accepted
    for ``user``) or :class:`Turn` objects. A non-empty ``system`` is prepended as its own
    turn, as in training.
    """
    turns = [Turn("system", system)] if system else []
    for m in messages:
        if isinstance(m, Turn):
            turns.append(m)
        else:
            role = "user" if m["role"] == "prompter" else m["role"]
            turns.append(Turn(role, m["content"]))
    text = format_chatml(turns) + (f"{IM_START}assistant\n" if add_generation_prompt else "")
    return tokenizer.encode(text)
