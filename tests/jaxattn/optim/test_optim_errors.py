"""Bad input to jaxattn.optim: clear ValueErrors naming the field (and the parameter)."""

import jax.numpy as jnp
import optax
import pytest

from jaxattn import optim

PARAMS = {"attn": {"q": jnp.zeros((16, 8))}, "t3": jnp.zeros((4, 2, 6)), "bias": jnp.zeros(8)}
ADAM = optax.scale_by_adam()


def _init(**kw):
    kw = {"rank": 4, "update_proj_gap": 2} | kw
    return optim.galore(ADAM, **kw).init(PARAMS)


def test_rank_larger_than_the_smaller_side_names_the_parameter():
    with pytest.raises(
        ValueError, match=r"rank=9 for the parameter at 'attn/q' \(shape \(16, 8\).*min\(m, n\) = 8"
    ):
        _init(rank=9)
    with pytest.raises(ValueError, match=r"rank=5 for the parameter at 't3'.*matrix \[4, 12\]"):
        _init(rank=lambda path, shape: 5 if len(shape) > 1 else None)
    with pytest.raises(ValueError, match="rank=0"):
        _init(rank=0)
    with pytest.raises(
        ValueError, match=r"rank=2 asked for the parameter at 'bias' of shape \(8,\)"
    ):
        _init(rank=lambda path, shape: 2)


@pytest.mark.parametrize("gap", [0, -3, 2.5, True])
def test_update_proj_gap_must_be_positive(gap):
    with pytest.raises(ValueError, match="update_proj_gap="):
        optim.galore(ADAM, rank=4, update_proj_gap=gap)
    with pytest.raises(ValueError, match="update_proj_gap="):
        optim.fira(ADAM, rank=4, update_proj_gap=gap)


def test_unknown_names_and_bad_options():
    with pytest.raises(ValueError, match=r"proj_type='sideways' is not one of \('std'"):
        optim.galore(ADAM, rank=4, update_proj_gap=2, proj_type="sideways")
    with pytest.raises(
        ValueError, match=r"projector='qr' is not one of \('svd', 'randomized', 'dct'\)"
    ):
        optim.galore(ADAM, rank=4, update_proj_gap=2, projector="qr")
    with pytest.raises(ValueError, match="moment_bits=4 must be 8 or 32"):
        optim.galore(ADAM, rank=4, update_proj_gap=2, moment_bits=4)
    with pytest.raises(ValueError, match="gamma=0.5 must be >= 1"):
        optim.fira(ADAM, rank=4, update_proj_gap=2, gamma=0.5)
    with pytest.raises(ValueError, match=r"fan_in_axes=3 for the parameter at 'attn/q'"):
        _init(fan_in_axes=3)
    with pytest.raises(ValueError, match="oversample=-1"):
        optim.Randomized(oversample=-1)
    with pytest.raises(ValueError, match="fira: proj_type='full' projects both sides of 'attn/q'"):
        optim.fira(ADAM, rank=4, update_proj_gap=2, proj_type="full").init(PARAMS)
    with pytest.raises(ValueError, match="every=0 must be a positive int"):
        optim.lowrank_refactor(ADAM, every=0)


def test_a_selection_that_selects_nothing():
    with pytest.raises(
        ValueError, match=r"galore: rank=.* selects no parameter.*paths look like \['attn/q'"
    ):
        _init(rank=lambda path, shape: None)
    with pytest.raises(ValueError, match="with mask selects no parameter"):
        _init(mask={"attn": {"q": False}, "t3": False, "bias": True})
    with pytest.raises(ValueError, match=r"galore: rank=4 selects no parameter"):
        optim.galore(ADAM, rank=4, update_proj_gap=2).init({"bias": jnp.zeros(8)})
    with pytest.raises(
        ValueError, match="gradnormlorp: rank=4 on the leaves named 'v' selects no parameter"
    ):
        optim.gradnormlorp(ADAM, rank=4, update_proj_gap=2).init(PARAMS)
    with pytest.raises(ValueError, match=r"factors=\('b', 'a'\) match no sibling pair"):
        optim.lowrank_refactor(ADAM, every=3).init(PARAMS)
    with pytest.raises(ValueError, match="mask has 1 leaves, the parameters 3"):
        _init(mask={"x": True})


def test_public_surface():
    missing = [name for name in optim.__all__ if not hasattr(optim, name)]
    assert not missing
    assert all(getattr(optim, name).__doc__ for name in optim.__all__)
