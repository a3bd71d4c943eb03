"""Token embedding [vocab, D], with range-checked token ids and a tied-head ``Linear`` view."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.layers._base import DTypeLike, cast, param
from jaxattn.layers._linear import Linear
from jaxattn.layers._validate import check_int

__all__ = ["Embed", "check_tokens", "invalid_tokens", "poison_after_invalid"]


class Embed(nnx.Module):
    """Lookup table [vocab, D] at parameter path ``table``.

    Token ids outside [0, vocab) are an error for concrete inputs. Under ``jax.jit`` (traced
    ids) they cannot be checked without a host round trip; there an out-of-range id embeds to
    zeros (never a wrapped or clamped id's vector), and ``models.DecoderLM`` turns the logits of
    that position and of every later position of its row into NaN (see ``invalid_tokens``).

    Args:
      vocab_size: number of tokens V.
      d_model: model width D.
      dtype: compute dtype of the looked-up vectors (None: the parameter dtype).
      param_dtype: parameter dtype.
      rngs: parameter RNGs.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_int("Embed", "vocab_size", vocab_size)
        check_int("Embed", "d_model", d_model)
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.table = param(rngs, (vocab_size, d_model), ("vocab", "embed"), dtype=param_dtype)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Embed int tokens [B, T]; returns x_BTD.

        Raises:
          ValueError: non-integer ids, or concrete ids outside [0, vocab).
        """
        tokens_BT = check_tokens(tokens_BT, self.vocab_size)
        table = self.table[...]
        x_BTD = jnp.take(table, jnp.clip(tokens_BT, 0, self.vocab_size - 1), axis=0)
        x_BTD = jnp.where(invalid_tokens(tokens_BT, self.vocab_size)[..., None], 0, x_BTD)
        return cast(x_BTD, self.dtype)

    def as_head(self, *, dtype: DTypeLike | None = None) -> Linear:
        """A ``Linear`` D -> V over this table (tied unembedding), sharing its parameter."""
        d = self.table.shape[1]
        return Linear(
            (d,),
            (self.vocab_size,),
            axes=("embed", "vocab"),
            dtype=dtype,
            kernel=self.table,
            transposed=True,
        )


def invalid_tokens(tokens_BT: jax.Array, vocab_size: int) -> jax.Array:
    """bool [B, T]: ids outside [0, vocab_size)."""
    return (tokens_BT < 0) | (tokens_BT >= vocab_size)


def poison_after_invalid(logits_BTV: jax.Array, tokens_BT: jax.Array, vocab_size: int):
    """NaN logits at every position at or after an out-of-range id of its row (traced ids)."""
    poisoned_BT = jnp.cumsum(invalid_tokens(tokens_BT, vocab_size), axis=1) > 0
    return jnp.where(poisoned_BT[..., None], jnp.nan, logits_BTV)


def check_tokens(tokens_BT, vocab_size: int) -> jax.Array:
    """``tokens_BT`` as an int array; concrete ids must lie in [0, vocab_size).

    Raises:
      ValueError: non-integer dtype, or a concrete id out of range (the first few are named).
    """
    tokens_BT = jnp.asarray(tokens_BT)
    if not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens_BT.dtype}")
    if not isinstance(tokens_BT, jax.core.Tracer) and tokens_BT.size:
        host = np.asarray(tokens_BT)  # on the host: inside a jit this is a closed-over constant
        bad = (host < 0) | (host >= vocab_size)
        if bad.any():
            ids = sorted({int(i) for i in host[bad][:5]})
            raise ValueError(f"token ids {ids} are outside the vocabulary [0, {vocab_size})")
    return tokens_BT
