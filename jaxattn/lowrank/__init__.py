"""jaxattn.lowrank: adapters on the ``Linear`` projections, attached by path.

Surgery
  linear_paths        every Linear of a model by module path (``layers/0/attn/q``, ``lm_head``)
  attach, detach      fill / empty the adapter slot of the projections a regex selects

Methods
  register_method, registered_methods, get_method, make_method, MethodConfig
                      adapter kinds by name (one module each in ``jaxattn.lowrank.methods``)

Applying (``_apply``)
  AdapterConfig, apply  a named adapter of a registered method on the projections targets select
  set_active, disabled  choose / weight the active adapters, or run the base model
  merge, unmerge        fold the active adapters into the kernels and back
  remove, trainable_count, AdapterSet
  save, load            ``adapter.safetensors`` + ``adapter_config.json``

PEFT interchange (``_peft``; peft 0.21.2's format, models from ``models.from_hf``)
  from_peft, to_peft  ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA, rsLoRA,
                      DoRA; per-module rank/alpha patterns; RandLoRA)

Mixed-adapter batches
  LoRABank            n LoRA adapters of one projection; row b uses ``sequence_ids_B[b]``
                      (method ``lora_bank``; S-LoRA / Punica gather, -1: no adapter)
  stack_adapters, unstack
                      n single (a, b, scale) LoRA adapters <-> one LoRABank
  mix                 the named LoRA adapters of a model as one bank per projection

The adapter methods themselves (LoRA and its family) build on this; ``jaxattn.layers.Adapter``
is the protocol an adapter follows and ``jaxattn.layers.AdapterParam`` its parameter type.
"""

from jaxattn.lowrank._apply import (
    AdapterConfig,
    AdapterSet,
    apply,
    disabled,
    merge,
    remove,
    set_active,
    trainable_count,
    unmerge,
)
from jaxattn.lowrank._io import load, save
from jaxattn.lowrank._mixed import mix, stack_adapters, unstack
from jaxattn.lowrank._peft import from_peft, to_peft
from jaxattn.lowrank._registry import (
    MethodConfig,
    get_method,
    make_method,
    register_method,
    registered_methods,
)
from jaxattn.lowrank._surgery import attach, detach, linear_paths
from jaxattn.lowrank.methods.lora_bank import LoRABank

__all__ = [
    "linear_paths",
    "attach",
    "detach",
    "MethodConfig",
    "register_method",
    "registered_methods",
    "get_method",
    "make_method",
    "AdapterConfig",
    "AdapterSet",
    "apply",
    "set_active",
    "disabled",
    "merge",
    "unmerge",
    "remove",
    "trainable_count",
    "save",
    "load",
    "from_peft",
    "to_peft",
    "LoRABank",
    "stack_adapters",
    "mix",
    "unstack",
]
