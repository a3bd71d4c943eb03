"""Parity with TransformerLens (transformer-lens==3.9.0, torch CPU fp32): a ``HookedTransformer``
built from a ``HookedTransformerConfig`` (no download) holding the same weights as a Llama-style
``DecoderLM`` (RMSNorm, split-half RoPE, SwiGLU; random GQA weights, and the trained recall
model with its sliding-window layer 0). Our hook points against TL's of the same
name: ``attn.pattern`` = ``hook_pattern``, ``attn.z`` = ``hook_z``, per-head outputs
``z · W_O[h]`` = ``hook_result``, ``resid_*``; zeroing a head's z gives the same logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tl = pytest.importorskip("transformer_lens")

from jaxattn import heads  # noqa: E402
from models import DecoderLM, get_config  # noqa: E402

TOL = 1e-5
# TL 3.x marks HookedTransformer deprecated in favour of 4.x's TransformerBridge (HF-only)
pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")


def _np(v):
    return np.asarray(v, np.float32)


def to_hooked(model):
    """A HookedTransformer with ``model``'s weights (a Llama-arch DecoderLM, MHA/GQA kind)."""
    c = model.config
    p = {"/".join(map(str, k)): _np(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))
         if isinstance(v, nnx.Param)}  # fmt: skip
    n, kvh = c.num_heads, c.num_kv_heads or c.num_heads
    h = p["layers/0/attn/q/kernel"].shape[-1]
    local = {}
    if c.sliding_window is not None:  # TL's "local" layers: key > query - window_size, as ours
        windowed = (
            range(c.num_layers) if c.sliding_window_layers is None else c.sliding_window_layers
        )
        types = ["local" if i in windowed else "global" for i in range(c.num_layers)]
        local = dict(use_local_attn=True, attn_types=types, window_size=c.sliding_window)
    cfg = tl.HookedTransformerConfig(
        n_layers=c.num_layers,
        d_model=c.d_model,
        n_ctx=c.max_seq_len,
        d_head=h,
        n_heads=n,
        n_key_value_heads=kvh if kvh != n else None,
        d_mlp=c.mlp_dim,
        d_vocab=c.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=c.norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=h,
        rotary_base=c.rope.theta,
        rotary_adjacent_pairs=False,  # split-half (GPT-NeoX / HF Llama) layout
        use_attn_result=True,
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
        **local,
    )
    ht = tl.HookedTransformer(cfg)
    gqa = "_" if kvh != n else ""
    sd = {"embed.W_E": p["embed/table"], "ln_final.w": p["final_norm/scale"]}
    sd["unembed.W_U"] = p["lm_head/kernel"]
    for i in range(c.num_layers):
        a, b = f"layers/{i}/", f"blocks.{i}."
        sd[b + "ln1.w"] = p[a + "attn_norm/scale"]
        sd[b + "ln2.w"] = p[a + "mlp_norm/scale"]
        sd[b + "attn.W_Q"] = p[a + "attn/q/kernel"].transpose(1, 0, 2)  # [N, D, H]
        sd[b + f"attn.{gqa}W_K"] = p[a + "attn/k/kernel"].transpose(1, 0, 2)
        sd[b + f"attn.{gqa}W_V"] = p[a + "attn/v/kernel"].transpose(1, 0, 2)
        sd[b + "attn.W_O"] = p[a + "attn/o/kernel"]  # [N, H, D]
        sd[b + "mlp.W_in"] = p[a + "mlp/up/kernel"]
        sd[b + "mlp.W_gate"] = p[a + "mlp/gate/kernel"]
        sd[b + "mlp.W_out"] = p[a + "mlp/down/kernel"]
    state = ht.state_dict()
    missing = sorted(k for k in sd if k not in state)
    assert not missing, f"TL has no {missing}"
    for k, v in sd.items():
        assert tuple(state[k].shape) == v.shape, (k, state[k].shape, v.shape)
        state[k] = torch.from_numpy(np.array(v))
    ht.load_state_dict(state, strict=True)
    return ht.eval()


@pytest.fixture(scope="module", params=["random-gqa", "trained-recall"])
def pair(request):
    if request.param == "random-gqa":
        model = DecoderLM(get_config("llama-tiny", max_seq_len=32), rngs=nnx.Rngs(3))
        toks = np.random.default_rng(0).integers(0, 256, (2, 12))
    else:
        from train.trained import eval_batch, load_trained

        model = load_trained("heads-recall")
        toks = eval_batch("heads-recall", batch_size=2)["inputs_BT"]
    return model, to_hooked(model), toks


def test_patterns_per_head_outputs_and_logits_match(pair):
    model, ht, toks = pair
    L = model.config.num_layers
    names = [f"blocks.{i}.{p}" for i in range(L)
             for p in ("attn.pattern", "attn.z", "resid_pre", "resid_mid")]  # fmt: skip
    logits, caps = heads.run_with_cache(model, jnp.asarray(toks), names)
    with torch.no_grad():
        tl_logits, tl_cache = ht.run_with_cache(torch.from_numpy(np.asarray(toks)))
    np.testing.assert_allclose(_np(logits), tl_logits.numpy(), atol=TOL * 10, rtol=TOL)
    for i in range(L):
        tl_of = {
            "attn.pattern": f"blocks.{i}.attn.hook_pattern",
            "attn.z": f"blocks.{i}.attn.hook_z",
            "resid_pre": f"blocks.{i}.hook_resid_pre",
            "resid_mid": f"blocks.{i}.hook_resid_mid",
        }
        for ours, theirs in tl_of.items():
            np.testing.assert_allclose(
                _np(caps[f"blocks.{i}.{ours}"]), tl_cache[theirs].numpy(), atol=TOL,
                err_msg=f"blocks.{i}.{ours} vs {theirs}",
            )  # fmt: skip
        # per-head outputs in the residual basis: z_h · W_O[h] (TL's hook_result)
        o_NHD = _np(model.layers[i].attn.o.kernel[...])
        result = np.einsum("btnh,nhd->btnd", _np(caps[f"blocks.{i}.attn.z"]), o_NHD)
        np.testing.assert_allclose(
            result, tl_cache[f"blocks.{i}.attn.hook_result"].numpy(), atol=TOL
        )


def test_head_ablation_gives_the_same_logits(pair):
    model, ht, toks = pair
    layer, head = model.config.num_layers - 1, 1
    logits, _ = heads.run_with_hooks(
        model, jnp.asarray(toks), [heads.mask_heads(f"blocks.{layer}.attn.z", head)]
    )

    def zero(z, hook):
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        tl_logits = ht.run_with_hooks(
            torch.from_numpy(np.asarray(toks)), fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)]
        )
    np.testing.assert_allclose(_np(logits), tl_logits.numpy(), atol=TOL * 10, rtol=TOL)
    plain = model(jnp.asarray(toks))
    assert np.abs(_np(plain) - _np(logits)).max() > 1e-3  # the ablation changed something
