"""jaxattn.heads: hook points on every block and attention kind (DESIGN.md Extension point 4).

Hooks are decided at trace time (``Context.hooks``, static): with none active, a model's
forward is the same program as without the mechanism. Points, per block i (layouts in
``jaxattn.heads._hooks``): ``blocks.i.resid_pre``, ``.attn.q``, ``.attn.k``, ``.attn.v``,
``.attn.scores``, ``.attn.pattern``, ``.attn.z``, ``.attn.out``, ``.resid_mid``, ``.mlp.out``,
``.resid_post``.

Hooks
  Capture(name, heads=, positions=, max_bytes=)   take a value out (scores / pattern: chosen
                                                  heads and query rows, exact from the op's LSE)
  Intervene(name, fn)                             replace a value by fn(value, ctx)
  scale_heads, mask_heads                         per-head interventions
  HookSet, hook_set, hook_names                   the resolved set a model carries; valid names
Running
  run_with_hooks(model, tokens, hooks, **kw) -> (logits, captures)
  run_with_cache(model, tokens, names=None, **kw) -> (logits, captures)
  decode_with_hooks(model, tokens, cache, hooks, **kw) -> (logits, cache, captures)
  HookCapture, pop_captures                       captures sown as nnx.Intermediate state
  probabilities                                   chosen rows of softmax from q, k and the LSE
Tools on the hooks (submodules)
  retrieval   Wu et al.'s copy-paste retrieval score, top / random heads, mask hooks
  pear        PEAR: suppression scores, frozen-model coefficients, exact fold into W_O
  methods     QK-score / attention score (MCQA), ICR, AttentionInfluence, LargePiG
  maps        WAAD / FAI, ACT sink detection and calibration, per-segment attention mass
  talking     Talking Heads: OV / QK products, SVD subspaces, composition scores, edits
  icl_regression  in-context linear regression testbed (one softmax attention layer)
  scan        ranked head tables and heads x layers heat maps (CLI: python -m train.heads_scan)

Example (capture head 1's probabilities at the last query row, and mask head 0's output):

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> from jaxattn import heads
>>> from models import DecoderLM, get_config
>>> model = DecoderLM(get_config("llama-tiny"), rngs=nnx.Rngs(0))
>>> tokens = jnp.arange(8)[None] % 256
>>> logits, caps = heads.run_with_hooks(model, tokens, [
...     heads.Capture("blocks.0.attn.pattern", heads=1, positions=-1),
...     heads.mask_heads("blocks.0.attn.z", 0)])
>>> caps["blocks.0.attn.pattern"].shape  # [B, heads, rows, S]
(1, 1, 1, 8)
>>> round(float(caps["blocks.0.attn.pattern"].sum()), 5)
1.0
"""

from jaxattn.heads import icl_regression, maps, methods, pear, retrieval, scan, talking
from jaxattn.heads._attend import probabilities
from jaxattn.heads._hooks import (
    ATTN_POINTS,
    BLOCK_POINTS,
    PATTERN_MAX_BYTES,
    Capture,
    HookCapture,
    HookSet,
    Intervene,
    hook_names,
    hook_set,
    mask_heads,
    pop_captures,
    scale_heads,
)
from jaxattn.heads._run import decode_with_hooks, run_with_cache, run_with_hooks

__all__ = [
    "ATTN_POINTS",
    "BLOCK_POINTS",
    "PATTERN_MAX_BYTES",
    "Capture",
    "Intervene",
    "scale_heads",
    "mask_heads",
    "HookSet",
    "hook_set",
    "hook_names",
    "run_with_hooks",
    "run_with_cache",
    "decode_with_hooks",
    "HookCapture",
    "pop_captures",
    "probabilities",
    "retrieval",
    "pear",
    "methods",
    "maps",
    "scan",
    "talking",
    "icl_regression",
]
