"""The words the text layer, the data loaders and the config share: roles, turns, loss modes,
and the input-error type.

A leaf: it imports nothing from the package, so :mod:`oasst_jax.tokenizer`,
:mod:`oasst_jax.chatml`, :mod:`oasst_jax.data` and :mod:`oasst_jax.config` can all build
on it without importing one another (loading a config pulls in no SentencePiece, and the
tokenizer and chatml know nothing of the dataset loaders).
"""

from __future__ import annotations

from dataclasses import dataclass

# Role id == index; the pretokenizer stores these ids per token (upstream
# ``pretokenize.py``: system 0, user 1, assistant 2, context 3).
ROLES: tuple[str, ...] = ("system", "user", "assistant", "context")

# Which tokens of an assistant turn the loss covers (``chatml.loss_mask`` explains them);
# the values of the train config's ``loss_on``.
LOSS_MODES: tuple[str, ...] = ("assistant_turn", "assistant_answer")


class DataError(ValueError):
    """A user-facing input error (missing file, unknown dataset, unsafe archive member).

    The message is one line naming the offending file, field or value.
    """


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation; ``role`` is one of :data:`ROLES`."""

    role: str
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")
