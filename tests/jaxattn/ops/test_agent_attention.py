"""Agent Attention (PAPERS.md §4): equals the two-step softmax reference (agent aggregation
then agent broadcast, + DWC) written here in torch as the authors' module does; linear cost in
T (score shapes T×n); agents = queries is two chained softmax attentions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops.agent_attention import adaptive_pool_matrix, agent_attention, agent_scores

torch = pytest.importorskip("torch")

# one compile per case instead of op-by-op dispatch
_agent = jax.jit(agent_attention, static_argnames="num_agents")


def _normal(seed, *shape):  # numpy-drawn: no eager jax.random compiles
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _inputs(b=2, t=24, n=3, h=8, seed=0):
    return tuple(_normal(100 * seed + i, b, t, n, h) for i in range(3))


def _torch_reference(q, k, v, n_agents, b1, b2, dwc_w, dwc_b):
    """The authors' AgentAttention forward, 1-D: agents = AdaptiveAvgPool1d(Q);
    agent aggregation V_A = softmax(A·scale Kᵀ + B1) V; agent broadcast
    O = softmax(Q·scale Aᵀ + B2) V_A; O += depthwise Conv1d(V) (groups = channels)."""
    q, k, v = (
        x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x), dtype=torch.float64)
        for x in (q, k, v)
    )
    b, t, n, h = q.shape
    scale = h**-0.5
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))  # [B, N, T, H] as the authors'
    pooled = torch.nn.functional.adaptive_avg_pool1d(
        q.reshape(b, t, n * h).transpose(1, 2), n_agents
    )
    agents = pooled.transpose(1, 2).reshape(b, n_agents, n, h).permute(0, 2, 1, 3)  # [B,N,n,H]
    agent_attn = (agents * scale) @ kh.transpose(-2, -1)
    if b1 is not None:
        agent_attn = agent_attn + torch.tensor(np.asarray(b1), dtype=torch.float64)
    agent_v = agent_attn.softmax(-1) @ vh
    q_attn = (qh * scale) @ agents.transpose(-2, -1)
    if b2 is not None:
        q_attn = q_attn + torch.tensor(np.asarray(b2), dtype=torch.float64)
    x = (q_attn.softmax(-1) @ agent_v).permute(0, 2, 1, 3)  # [B, T, N, V]
    if dwc_w is not None:
        w = torch.tensor(np.asarray(dwc_w), dtype=torch.float64)  # [W, N, V]
        conv_w = w.reshape(w.shape[0], n * h).T[:, None, :]  # [C, 1, W]
        conv_b = torch.tensor(np.asarray(dwc_b), dtype=torch.float64).reshape(n * h)
        vc = v.reshape(b, t, n * h).transpose(1, 2)
        dwc = torch.nn.functional.conv1d(vc, conv_w, conv_b, padding=w.shape[0] // 2, groups=n * h)
        x = x + dwc.transpose(1, 2).reshape(b, t, n, h)
    return x  # float64 tensor [B, T, N, V] (differentiable in q, k, v)


@pytest.mark.parametrize("t, n_agents", [(24, 4), (23, 5)], ids=["t24_n4", "t23_n5_uneven"])
def test_equals_two_step_reference_with_bias_and_dwc(t, n_agents):
    q, k, v = _inputs(t=t)
    b1 = 0.5 * _normal(90, 3, n_agents, t)
    b2 = 0.5 * _normal(91, 2, 3, t, n_agents)  # per batch and head
    w = 0.3 * _normal(92, 3, 3, 8)
    bias = 0.1 * _normal(93, 3, 8)
    got = _agent(
        q, k, v, num_agents=n_agents, agent_bias=b1, query_bias=b2, dwc_kernel=w, dwc_bias=bias
    )
    want = _torch_reference(q, k, v, n_agents, b1, b2, w, bias)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    plain = _agent(q, k, v, num_agents=n_agents)
    np.testing.assert_allclose(
        plain, _torch_reference(q, k, v, n_agents, None, None, None, None), atol=2e-5, rtol=2e-5
    )


def test_agents_equal_queries_is_two_chained_softmax_attentions():
    q, k, v = _inputs(t=16, seed=1)
    got = _agent(q, k, v, num_agents=16)  # n = T: each agent is one query
    agent_v = jax.nn.dot_product_attention(q, k, v)  # agents (= Q) attend to K, V
    want = jax.nn.dot_product_attention(q, q, agent_v)  # queries attend to the agents
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_pool_bins_are_pytorch_adaptive_bins():
    # T=5 -> 3 bins: [0, 2), [1, 4), [3, 5) (overlapping, as torch's AdaptiveAvgPool)
    want = np.array([[0.5, 0.5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(adaptive_pool_matrix(5, 3), want, rtol=1e-6)


def test_cost_is_linear_in_t():
    for t in (64, 256):
        q, k, _ = _inputs(b=1, t=t, n=2)
        s_agent, s_query = agent_scores(q, k, num_agents=8)
        assert s_agent.shape == (1, 2, 8, t) and s_query.shape == (1, 2, t, 8)
        jaxpr = jax.make_jaxpr(lambda a, b, c: agent_attention(a, b, c, num_agents=8))(q, k, k)
        biggest = max(
            int(np.prod(o.aval.shape)) for eq in jaxpr.eqns for o in eq.outvars if o.aval.shape
        )
        assert biggest <= 8 * t * 2 * 8, biggest  # no T x T intermediate: O(T·n·H) at most


def test_bad_input_names_argument():
    q, k, v = _inputs(t=8)
    with pytest.raises(ValueError, match="num_agents=9"):
        _agent(q, k, v, num_agents=9)
    with pytest.raises(ValueError, match="agent_bias must be"):
        _agent(q, k, v, num_agents=2, agent_bias=jnp.zeros((3, 8, 2)))
    with pytest.raises(ValueError, match="query_bias must be"):
        _agent(q, k, v, num_agents=2, query_bias=jnp.zeros((3, 2, 8)))
    with pytest.raises(ValueError, match="dwc kernel must be"):
        _agent(q, k, v, num_agents=2, dwc_kernel=jnp.zeros((2, 3, 8)))
    with pytest.raises(ValueError, match="one kv head per query head"):
        _agent(q, k[:, :, :1], v[:, :, :1], num_agents=2)
    with pytest.raises(ValueError, match="dwc_bias is given"):
        _agent(q, k, v, num_agents=2, dwc_bias=jnp.zeros((3, 8)))


def test_agent_kind_layer_equals_op_and_refuses_causal_use():
    from flax import nnx

    from jaxattn.layers import AgentAttentionConfig, kind_config, registered_kinds

    assert "agent" in registered_kinds() and kind_config("agent") is AgentAttentionConfig
    cfg = AgentAttentionConfig(d_model=24, num_heads=3, num_agents=4, seq_len=16)
    layer = cfg.build(rngs=nnx.Rngs(0))
    x = _normal(2, 2, 12, 24)
    y = nnx.jit(lambda m, x: m(x))(layer, x)

    @nnx.jit
    def by_op(m, x):
        o = agent_attention(
            m.q(x), m.k(x), m.v(x), num_agents=4, agent_bias=m.agent_bias[:, :, :12],
            query_bias=m.query_bias[:, :12], dwc_kernel=m.dwc_kernel[...],
            dwc_bias=m.dwc_bias[...],
        )  # fmt: skip
        return m.o(o)

    np.testing.assert_allclose(y, by_op(layer, x), atol=1e-5, rtol=1e-5)
    assert layer.agent_bias.shape == (3, 4, 16) and layer.dwc_kernel.shape == (3, 3, 8)
    bare = AgentAttentionConfig(
        d_model=24, num_heads=3, num_agents=4, seq_len=16, agent_bias=False, dwc_width=0
    ).build(rngs=nnx.Rngs(0))
    assert not hasattr(bare, "agent_bias") and not hasattr(bare, "dwc_kernel")
    with pytest.raises(ValueError, match="cannot serve a causal decoder model"):
        AgentAttentionConfig.from_model(object(), 0)
    with pytest.raises(NotImplementedError, match="no cache and no decode"):
        layer.decode(jnp.zeros((2, 1, 24)), None)
    with pytest.raises(NotImplementedError, match="no cache and no decode"):
        layer.init_cache(2, 16)
    with pytest.raises(ValueError, match=r"input length 3 must be in \[num_agents=4"):
        layer(jnp.zeros((1, 3, 24)))
    with pytest.raises(ValueError, match="dwc_width=2 must be odd"):
        AgentAttentionConfig(d_model=24, num_heads=3, num_agents=4, seq_len=16, dwc_width=2)
    with pytest.raises(ValueError, match="num_agents=17 exceeds seq_len=16"):
        AgentAttentionConfig(d_model=24, num_heads=3, num_agents=17, seq_len=16)


def test_decoder_model_with_agent_layer_is_refused():
    import dataclasses

    from flax import nnx

    from models import DecoderLM, get_config
    from models.configs import LayerSpec

    spec = LayerSpec.of("agent", num_agents=4, seq_len=16)
    with pytest.raises(ValueError, match="'agent' .* cannot serve a causal decoder model"):
        cfg = dataclasses.replace(get_config("llama-tiny"), layer_pattern=(spec,))
        DecoderLM(cfg, rngs=nnx.Rngs(0))


def test_gradients_match_the_torch_reference():
    q, k, v = _inputs(b=1, t=12, n=2, seed=3)
    w = 0.3 * _normal(4, 3, 2, 8)
    bias = jnp.zeros((2, 8))
    grads = jax.jit(  # one compile for the forward and backward
        jax.grad(
            lambda *a: jnp.sum(jnp.sin(_agent(*a, num_agents=3, dwc_kernel=w, dwc_bias=bias))),
            argnums=(0, 1, 2),
        )
    )(q, k, v)
    tq, tk, tv = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (q, k, v))
    for x in (tq, tk, tv):
        x.requires_grad_(True)
    out = _torch_reference(tq, tk, tv, 3, None, None, w, bias)
    torch.sin(out).sum().backward()
    for a, b in zip(grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(a, b.numpy(), atol=5e-5, rtol=5e-5)
