"""The head-layout kinds of issue 15 have no Hugging Face form: export refuses them by name."""

import pytest
from flax import nnx

from models import DecoderLM, get_config, to_hf


@pytest.mark.parametrize(
    "name, kind",
    [("kdgqa-tiny", "kdgqa"), ("dgqa-tiny", "dgqa"), ("pgqa-tiny", "pgqa"),
     ("diffqkv-tiny", "diffqkv"),
     ("ccgqa-tiny", "cca"), ("lowrank-mhsa-tiny", "lowrank_mhsa")],
)  # fmt: skip
def test_export_refuses_naming_the_kind(tmp_path, name, kind):
    model = nnx.eval_shape(lambda: DecoderLM(get_config(name, num_layers=1), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=f"attention kind '{kind}'.*no Hugging Face equivalent"):
        to_hf(model, str(tmp_path))
