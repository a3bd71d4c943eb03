"""LoKU as an adapter method: LoRA whose factors start from FILA (``jaxattn.lowrank.loku``).

``loku`` is a ``lora`` adapter (same fields, same adapter; saved, merged and exported as LoRA)
with the two pieces of its procedure named by the method: the adapter starts from FILA, the
Fisher-weighted low-rank part of each adapted W on the forget set relative to a retain set (the
base becoming W_res = W − s·a·b, so the model is unchanged at init), and it trains with the
inverted hinge loss on the forget set. ``train.finetune --adapter loku`` runs both by name (its
callbacks are in ``train/adapter_procedures.py``): the run's training data is the forget set,
``retain_data`` the retain set.

Attributes (beyond LoRA's):
  retain_data: data source of the retain set (``"builtin"``, a .npy of token ids, a text file
    or folder: ``train.data.load_tokens``); ``""``: no retain set, F_r = 1 (F̂ = F_f).
  fisher_batches: how many batches of each set estimate the empirical Fisher (per sequence).
"""

from __future__ import annotations

import dataclasses

from jaxattn.lowrank._registry import register_method
from jaxattn.lowrank.methods._seeds_common import check_field, is_int
from jaxattn.lowrank.methods.lora import LoRAConfig


@register_method("loku")
@dataclasses.dataclass(frozen=True)
class LoKUConfig(LoRAConfig):
    """LoRA + FILA init + inverted hinge loss (module docstring)."""

    init: str = "zero"
    retain_data: str = ""
    fisher_batches: int = 2

    def validate(self, path, linear) -> None:
        super().validate(path, linear)
        where = f"loku at {path!r}"
        check_field(where, self, "init", self.init == "zero", "'zero' (FILA sets the factors)")
        check_field(where, self, "use_dora", not self.use_dora, "False (FILA writes LoRA only)")
        ok = is_int(self.fisher_batches) and self.fisher_batches >= 1
        check_field(where, self, "fisher_batches", ok, "an int >= 1")
        check_field(where, self, "retain_data", isinstance(self.retain_data, str), "a str")
