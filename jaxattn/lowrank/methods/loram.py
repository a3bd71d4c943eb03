"""LoRAM as an adapter method: LoRA trained on a structurally pruned copy of the base.

``loram`` is a ``lora`` adapter whose training procedure prunes first and recovers after
(``jaxattn.lowrank.loram``): ``train.finetune --adapter loram --set adapter.kv_keep=...
adapter.mlp_keep=...`` trains LoRA on the model :func:`~jaxattn.lowrank.loram.prune_model` makes
with :func:`~jaxattn.lowrank.loram.l2_plan` (per layer the ``kv_keep`` GQA groups and
``mlp_keep`` MLP channels of largest weight norm), then writes to ``<run>/adapter`` the
adapter :func:`~jaxattn.lowrank.loram.recover` scatters back to the original model's shapes —
a plain ``lora`` adapter of the original base (its callbacks: ``train/adapter_procedures.py``).

Attributes (beyond LoRA's):
  kv_keep: GQA groups (kv heads with their query heads) kept per layer, >= 1.
  mlp_keep: MLP channels kept per layer, >= 1.
"""

from __future__ import annotations

import dataclasses

from jaxattn.lowrank._registry import register_method
from jaxattn.lowrank.methods._seeds_common import check_field, is_int
from jaxattn.lowrank.methods.lora import LoRAConfig


@register_method("loram")
@dataclasses.dataclass(frozen=True)
class LoRAMConfig(LoRAConfig):
    """LoRA on a pruned copy, recovered for the original (module docstring)."""

    kv_keep: int = 1
    mlp_keep: int = 1

    def validate(self, path, linear) -> None:
        super().validate(path, linear)
        where = f"loram at {path!r}"
        for field in ("kv_keep", "mlp_keep"):
            value = getattr(self, field)
            check_field(where, self, field, is_int(value) and value >= 1, "an int >= 1")
        check_field(where, self, "use_dora", not self.use_dora, "False (recover writes LoRA)")
        ok = self.init not in ("pissa", "olora")
        check_field(where, self, "init", ok, "an init that keeps the base (not pissa/olora)")
