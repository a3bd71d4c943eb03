"""Attention kinds: the layer protocol, its shared flow, and the registry (Extension point 3).

A kind is a frozen config dataclass with

* ``kind`` (class attribute): its registered name;
* ``build(*, rngs) -> layer``: the module;
* ``from_model(model_config, layer) -> config`` (classmethod): the layer's config from a model
  config's fields (read by attribute: jaxattn never imports ``models``);

and its module subclasses :class:`AttentionLayer`, whose ``__call__`` and ``decode`` are the one
flow every kind shares, through named stages a kind overrides:

    project -> qk_transform -> attend | attend_cache -> head_gate -> out

``project`` computes the kind's queries and keys/values from x (Linear projections);
``qk_transform`` applies norms, rotary embeddings, temperatures; ``attend`` is the op over the
sequence itself, ``attend_cache`` hands the new queries and keys/values to the cache, which
attends over itself and stores them (``update_and_attend``, DESIGN.md Extension point 6: a layer
never reads a cache's buffers, and the cache's policy decides what is kept);
``head_gate`` weights, masks or blends the per-head outputs [B, T, N, V] (identity by default);
``out`` projects back to the model width. ``register_kind(name, config_cls)`` makes a kind
available to ``models.ModelConfig`` (``attention=`` and per-layer ``layer_specs``).

The default ``attend`` is ``dot_product_attention(*attention_inputs(q, kv, ctx),
**attention_args(ctx))``: a kind says which operands and which op arguments its attention over
the sequence uses, and ``jaxattn.heads`` reads the same two to expose q / k / v / scores /
pattern (recomputed from the op's LSE) at its hook points (Extension point 4). Hook points are
decided at trace time through ``ctx.hooks``: with none active the flow below runs exactly as
if the hook lines were absent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.layers._context import Context
from jaxattn.ops.attention import dot_product_attention

__all__ = ["AttentionLayer", "register_kind", "kind_config", "registered_kinds", "hook_point"]

_KINDS: dict[str, type] = {}


def register_kind(name: str, config_cls: type, *, replace: bool = False) -> type:
    """Register ``config_cls`` as the attention kind ``name``; returns ``config_cls``.

    Raises:
      ValueError: ``name`` is taken (unless ``replace``), or the class lacks the protocol.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"kind name must be a non-empty string, got {name!r}")
    missing = [m for m in ("build", "from_model") if not callable(getattr(config_cls, m, None))]
    if missing:
        raise ValueError(f"{config_cls.__name__} cannot be a kind: it has no {missing}")
    if name in _KINDS and not replace and _KINDS[name] is not config_cls:
        raise ValueError(f"attention kind {name!r} is already registered ({_KINDS[name]})")
    _KINDS[name] = config_cls
    config_cls.kind = name
    return config_cls


def kind_config(name: str) -> type:
    """The config class of the registered kind ``name``.

    Raises:
      ValueError: an unknown kind (the registered ones are listed).
    """
    if name not in _KINDS:
        raise ValueError(f"unknown attention kind {name!r}; registered: {registered_kinds()}")
    return _KINDS[name]


def registered_kinds() -> tuple[str, ...]:
    """The names of every registered attention kind."""
    return tuple(sorted(_KINDS))


class AttentionLayer(nnx.Module):
    """The flow every attention kind shares; subclasses implement the stages.

    Subclasses set ``self.config`` (with ``d_model``) and implement ``project``,
    ``attention_inputs`` and ``attention_args`` (or override ``attend``), ``attend_cache``,
    ``out`` and ``init_cache``; ``qk_transform`` and ``head_gate`` default to the identity.

    Hook points (``jaxattn.heads``; full names ``blocks.<i>.attn.<point>``): ``q``, ``k``, ``v``
    (``attention_inputs``' operands), ``scores`` and ``pattern`` (the op's logits and
    probabilities), ``z`` (per-head outputs after ``head_gate``: what ``out`` reads) and
    ``out`` (the layer's output).
    """

    config: Any

    # -- stages -----------------------------------------------------------------------------
    def project(self, x_BTD: jax.Array, ctx: Context):
        """x -> (queries, keys/values) in the kind's own layout."""
        raise NotImplementedError

    def qk_transform(self, q, kv, ctx: Context):
        """Norms, rotary embeddings, temperatures on queries and keys (identity here)."""
        return q, kv

    def attention_inputs(self, q, kv, ctx: Context):
        """The op's operands over the sequence itself: (q_BTNH, k_BSKH, v_BSKV)."""
        raise NotImplementedError(f"{type(self).__name__} does not define attention_inputs")

    def attention_args(self, ctx: Context) -> dict:
        """The op's keyword arguments over the sequence itself (mask, scale, segments, ...)."""
        raise NotImplementedError(f"{type(self).__name__} does not define attention_args")

    def attend(self, q, kv, ctx: Context) -> jax.Array:
        """Causal attention over the sequence itself -> per-head outputs o_BTNV."""
        return dot_product_attention(*self.attention_inputs(q, kv, ctx), **self.attention_args(ctx))

    def attend_cache(self, q, kv, cache, ctx: Context, *, num_new_B=None):
        """Attend over ``cache`` and the new keys/values, store and count the first
        ``num_new_B`` of them (``cache.update_and_attend``) -> (o_BTNV, cache)."""
        raise NotImplementedError

    def head_gate(self, o_BTNV: jax.Array, ctx: Context, x_BTD: jax.Array | None = None):
        """Per-head weights, masks or blends of o_BTNV (identity here); ``x_BTD`` is the
        layer's input, for gates computed from the tokens (a router)."""
        return o_BTNV

    def out(self, o_BTNV: jax.Array, ctx: Context) -> jax.Array:
        """Per-head outputs -> [B, T, D]."""
        raise NotImplementedError

    def init_cache(self, batch: int, capacity: int, dtype=jnp.bfloat16, cache=None):
        """An empty cache for this layer (its format and policy: ``cache_config(cache)``)."""
        raise NotImplementedError

    def cache_config(self, cache=None):
        """The ``CacheConfig`` this layer's cache is built from: ``config.cache``, or with the
        fields of ``cache`` set (a dict such as ``{"format": "kivi", "bits": 2}``, applied over
        the layer's own config so a policy and a format combine), or ``cache`` itself (a
        ``CacheConfig``).

        Raises:
          ValueError: the merged config is invalid or the kind cannot serve it (the field named).
        """
        c = self.config
        if cache is None:
            return c.cache
        from jaxattn.cache import CacheConfig

        if not isinstance(cache, CacheConfig):
            fields = {**(c.cache or CacheConfig()).to_dict(), **dict(cache)}
            cache = CacheConfig.from_dict(fields)
        dataclasses.replace(c, cache=cache)  # the kind's own checks: formats, policies
        return cache

    # -- the shared flow ----------------------------------------------------------------------
    def _check_input(self, x_BTD) -> jax.Array:
        x_BTD = jnp.asarray(x_BTD)
        d = self.config.d_model
        if x_BTD.ndim != 3 or x_BTD.shape[-1] != d:
            raise ValueError(
                f"{type(self).__name__} input must be [batch, length, d_model={d}], "
                f"got shape {x_BTD.shape}"
            )
        return x_BTD

    def __call__(self, x_BTD: jax.Array, ctx: Context | None = None) -> jax.Array:
        """Causal self-attention over the whole input (training, cache-free prefill).

        Args:
          x_BTD: input [B, T, D].
          ctx: the call context (positions, segments, rng, hooks); default positions 0..T-1.

        Returns:
          out_BTD [B, T, D].
        """
        x_BTD = self._check_input(x_BTD)
        b, t, _ = x_BTD.shape
        ctx = Context.create(b, t) if ctx is None else ctx
        q, kv = self.qk_transform(*self.project(x_BTD, ctx), ctx)
        if ctx.hooks:  # points q, k, v, scores, pattern
            o_BTNV = ctx.hooks.attend(self, q, kv, ctx)
        else:
            o_BTNV = self.attend(q, kv, ctx)
        o_BTNV = hook_point(self, ctx, "attn.z", self.head_gate(o_BTNV, ctx, x_BTD))
        return hook_point(self, ctx, "attn.out", self.out(o_BTNV, ctx))

    def decode(
        self,
        x_BTD: jax.Array,
        cache,
        ctx: Context | None = None,
        *,
        num_new_B: jax.Array | None = None,
    ):
        """Attend T new tokens to the cache and themselves (prefill or decode step).

        Token t of sequence b sits at position ``cache.lengths_B[b] + t``.

        Args:
          x_BTD: new tokens' inputs [B, T, D].
          cache: this layer's cache (from ``init_cache`` or a previous ``decode``).
          ctx: the call context; its positions are replaced by the cache positions.
          num_new_B: valid new tokens per sequence (default T); trailing padding is written
            but not counted, so the next write overwrites it.

        Returns:
          (out_BTD, cache advanced by num_new_B).

        Raises:
          ValueError: a batch mismatch, or a full cache that would overflow (see
            ``jaxattn.cache``: under jit, checkify reports it and outputs are NaN).
        """
        x_BTD = self._check_input(x_BTD)
        b, t, _ = x_BTD.shape
        if cache.lengths_B.shape != (b,):
            raise ValueError(
                f"cache holds {cache.lengths_B.shape[0]} sequences but the input has batch {b}"
            )
        positions_BT = cache.positions_BT(t)
        if ctx is None:
            ctx = Context.create(b, t, positions_BT=positions_BT)
        # a cache of pre-RoPE keys (KVQuant) rotates them itself, at attention time
        pre_rope = bool(getattr(cache, "pre_rope", False))
        ctx = ctx.replace(positions_BT=positions_BT, decoding=True, keys_pre_rope=pre_rope)
        q, kv = self.qk_transform(*self.project(x_BTD, ctx), ctx)
        if ctx.hooks:  # points q, k, v of the new tokens (capture only)
            ctx.hooks.decode_inputs(self, q, kv, ctx)
        o_BTNV, cache = self.attend_cache(q, kv, cache, ctx, num_new_B=num_new_B)
        o_BTNV = hook_point(self, ctx, "attn.z", self.head_gate(o_BTNV, ctx, x_BTD))
        return hook_point(self, ctx, "attn.out", self.out(o_BTNV, ctx)), cache


def hook_point(module: nnx.Module, ctx: Context, name: str, value):
    """``value`` through the hooks active at point ``name`` of ``module`` (``ctx.hooks``,
    ``jaxattn.heads``): captured and/or changed. With no hook active, ``value`` itself and
    nothing traced.
    """
    return ctx.hooks.point(module, ctx, name, value) if ctx.hooks else value


def dropout_args(rate: float, ctx: Context, tag: int) -> dict:
    """``dot_product_attention`` keyword arguments for attention dropout at ``rate``: none
    when the rate is 0 or the context has no rng (evaluation)."""
    key = ctx.key(tag) if rate > 0 else None
    return {} if key is None else {"dropout_rate": rate, "dropout_rng": key}
