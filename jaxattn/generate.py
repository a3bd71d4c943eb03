"""Autoregressive generation with a fixed-capacity cache, driven by ``jax.lax.while_loop``.

``generate`` prefills the (right-padded, ragged) prompts in one ``decode`` call, then samples
one token per sequence per loop step until ``max_new_tokens`` or every sequence has emitted a
stop token. The whole loop is one jitted program; the cache is part of the loop carry.
Works with any model offering ``init_cache(batch, capacity)`` and
``decode(tokens_BT, cache, *, num_new_B) -> (logits_BTV, cache)`` (``models.DecoderLM``).
``cache`` names a storage format (and any other ``CacheConfig`` fields) for this call, set over
every layer's own cache config: ``cache={"format": "kivi", "bits": 2}`` decodes with 2-bit KIVI
caches (the model's ``init_cache(..., cache=)`` builds them). The caches are opaque here: before
anything runs, each cache in the model's ``init_cache``
pytree that offers ``check_room(n)`` (``jaxattn.cache``) is asked whether it can hold the
prompt plus ``max_new_tokens`` (ring caches always can).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.cache import CacheConfig

__all__ = ["generate", "sample_logits", "GenerateOutput"]


class GenerateOutput(NamedTuple):
    """``tokens_BS[b, :lengths_B[b]]`` is prompt b followed by its generated tokens (a stop
    token included); the rest is 0. S = prompt length + max_new_tokens."""

    tokens_BS: jax.Array
    lengths_B: jax.Array


def sample_logits(logits_BV, rng, *, temperature=0.0, top_k=None, top_p=None) -> jax.Array:
    """Pick one token per row: greedy when temperature == 0, else top-k / nucleus sampling.

    Args:
      logits_BV: float logits [B, V].
      rng: PRNG key (unused when greedy).
      temperature: softmax temperature (0: argmax).
      top_k: keep the k most likely tokens (None: all).
      top_p: keep the smallest set of tokens whose probability reaches top_p (None: all).

    Returns:
      int32 tokens [B].
    """
    vocab = logits_BV.shape[-1]
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be in [1, vocabulary size {vocab}]")
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep a token if the mass strictly before it is below top_p (the first always stays).
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_BV = jnp.where(before_BV < top_p, sorted_BV, jnp.inf)
        cutoff_B1 = jnp.min(kept_BV, axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def generate(
    model,
    prompt_BT,
    prompt_lengths_B,
    *,
    max_new_tokens: int,
    rng,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: tuple[int, ...] = (),
    cache_dtype=None,
    sequence_ids_B=None,
    capacity: int | None = None,
    cache=None,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: e.g. a ``models.DecoderLM``.
      prompt_BT: int prompts [B, T], right-padded.
      prompt_lengths_B: int [B] real prompt lengths, each in [1, T].
      max_new_tokens: the most tokens appended per sequence.
      rng: PRNG key for sampling.
      temperature, top_k, top_p: see ``sample_logits`` (temperature 0 is greedy).
      stop_tokens: a sequence stops after emitting one of these.
      cache_dtype: cache storage dtype (default the model's compute dtype).
      sequence_ids_B: int [B] per-sequence ids passed to every ``decode`` call (which adapter
        or task a row uses); None passes nothing.
      capacity: the ``init_cache`` capacity (default T + max_new_tokens, which always fits;
        "sink_window" layers ignore it).
      cache: ``jaxattn.cache.CacheConfig`` fields (a dict) set over every layer's cache config
        for this call (e.g. ``{"format": "kivi", "bits": 2, "group_size": 32}``), or None:
        the model's own; or a ``CacheConfig`` for every layer, or a tuple / list of one entry
        per layer (dicts, ``CacheConfig``s or None: e.g. per-layer calibrated KVQuant
        codebooks). Passed to ``model.init_cache(..., cache=)``.

    Raises:
      ValueError: bad shapes, prompt lengths, sampling settings, prompt ids outside the
        model's vocabulary (``model.config.vocab_size``, when the model has one), or a cache
        that cannot hold T + max_new_tokens positions (names its capacity), before any work.

    Returns:
      GenerateOutput(tokens_BS [B, T + max_new_tokens], lengths_B).
    """
    prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
    if prompt_BT.ndim != 2:
        raise ValueError(f"prompt_BT must be [batch, length], got shape {prompt_BT.shape}")
    lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
    if lengths_B.shape != prompt_BT.shape[:1]:
        raise ValueError(f"prompt_lengths_B {lengths_B.shape} must be [{prompt_BT.shape[0]}]")
    if not isinstance(lengths_B, jax.core.Tracer):
        lo, hi = int(lengths_B.min()), int(lengths_B.max())
        if lo < 1 or hi > prompt_BT.shape[1]:
            raise ValueError(
                f"prompt_lengths_B must lie in [1, {prompt_BT.shape[1]}], got {lo}..{hi}"
            )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    traced = isinstance(prompt_BT, jax.core.Tracer) or isinstance(lengths_B, jax.core.Tracer)
    if vocab is not None and not traced:
        prompt, lengths = np.asarray(prompt_BT), np.asarray(lengths_B)
        live_BT = np.arange(prompt.shape[1])[None, :] < lengths[:, None]
        bad = live_BT & ((prompt < 0) | (prompt >= vocab))
        if bad.any():
            ids = sorted({int(i) for i in prompt[bad][:5]})
            raise ValueError(f"prompt token ids {ids} are outside the vocabulary [0, {vocab})")
    if top_k is not None and vocab is not None and top_k > vocab:
        raise ValueError(f"top_k={top_k} must be <= the vocabulary size {vocab}")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    if (
        temperature < 0
        or (top_p is not None and not 0 < top_p <= 1)
        or (top_k is not None and top_k < 1)
    ):
        raise ValueError(f"bad sampling settings: {temperature=}, {top_k=}, {top_p=}")
    b, t = prompt_BT.shape
    capacity = t + max_new_tokens if capacity is None else int(capacity)
    cache_fields = _freeze(cache)  # hashable: a static argument of the compiled loop
    caches = jax.eval_shape(lambda: model.init_cache(b, capacity, cache_dtype, **_kw(cache_fields)))
    for cache in jax.tree.leaves(caches, is_leaf=lambda x: hasattr(x, "check_room")):
        if hasattr(cache, "check_room"):
            try:
                cache.check_room(t + max_new_tokens)
            except ValueError as err:
                raise ValueError(
                    f"generate: prompt length {t} + max_new_tokens={max_new_tokens}: {err}"
                ) from None
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompt_BT,
        lengths_B,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        cache_dtype=cache_dtype,
        capacity=capacity,
        cache_fields=cache_fields,
        extras={} if sequence_ids_B is None else {"sequence_ids_B": jnp.asarray(sequence_ids_B)},
    )


def _freeze_one(entry):
    """One cache entry hashable: None and ``CacheConfig`` (frozen) as they are, a dict as
    ("fields", its sorted items)."""
    if entry is None or isinstance(entry, CacheConfig):
        return entry
    return ("fields", tuple(sorted(dict(entry).items())))


def _thaw_one(entry):
    return dict(entry[1]) if isinstance(entry, tuple) else entry


def _freeze(cache):
    """``generate``'s ``cache`` argument as a hashable value (``_kw`` inverts it)."""
    if isinstance(cache, (tuple, list)):
        return ("layers", tuple(_freeze_one(c) for c in cache))
    return _freeze_one(cache)


def _kw(cache_fields):
    """``init_cache``'s keyword arguments for the (static, hashable) ``cache`` fields."""
    if cache_fields is None:
        return {}
    if isinstance(cache_fields, tuple) and cache_fields[0] == "layers":
        return {"cache": tuple(_thaw_one(c) for c in cache_fields[1])}
    return {"cache": _thaw_one(cache_fields)}


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=(
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "stop_tokens",
        "cache_dtype",
        "capacity",
        "cache_fields",
    ),
)
def _generate(
    graphdef,
    state,
    prompt_BT,
    lengths_B,
    rng,
    *,
    extras,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    stop_tokens,
    cache_dtype,
    capacity,
    cache_fields,
):
    model = nnx.merge(graphdef, state)
    b, t = prompt_BT.shape
    slots_S = jnp.arange(t + max_new_tokens, dtype=jnp.int32)
    tokens_BS = jnp.zeros((b, t + max_new_tokens), jnp.int32).at[:, :t].set(prompt_BT)
    tokens_BS = jnp.where(slots_S[None, :] < lengths_B[:, None], tokens_BS, 0)
    cache = model.init_cache(b, capacity, cache_dtype, **_kw(cache_fields))
    logits_BTV, cache = model.decode(prompt_BT, cache, num_new_B=lengths_B, **extras)
    last_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, cache, last_BV, tokens_BS, lengths_B, done_B, rng = carry
        rng, key = jax.random.split(rng)
        tok_B = sample_logits(last_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)
        live_B = ~done_B
        write_BS = live_B[:, None] & (slots_S[None, :] == lengths_B[:, None])
        tokens_BS = jnp.where(write_BS, tok_B[:, None], tokens_BS)
        lengths_B = lengths_B + live_B.astype(jnp.int32)
        done_B = done_B | jnp.isin(tok_B, stops)
        live = live_B.astype(jnp.int32)
        logits_B1V, cache = model.decode(tok_B[:, None], cache, num_new_B=live, **extras)
        return i + 1, cache, logits_B1V[:, 0], tokens_BS, lengths_B, done_B, rng

    done_B = jnp.zeros((b,), bool)
    carry = (jnp.int32(0), cache, last_BV, tokens_BS, lengths_B, done_B, rng)
    _, _, _, tokens_BS, lengths_B, _, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens_BS, lengths_B)
