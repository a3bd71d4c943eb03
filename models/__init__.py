"""Decoder models built from jaxattn layers, and Hugging Face checkpoint import/export.

Config and model
  ModelConfig                 frozen keyword-only hyper-parameters (validated)
  LayerSpec                   one layer's attention kind and fields (ModelConfig.layer_specs)
  DecoderLM                   ``model(tokens_BT) -> logits_BTV``; ``init_cache`` / ``decode``
  get_config, list_configs    named configs ("llama-tiny", "mla-tiny-default", "llama3-8b", ...)
KV-cache calibration (``models.kv_calibrate``)
  calibrate_kvquant           per-layer KVQuant nuq CacheConfigs fitted on calibration tokens
Hugging Face interchange (safetensors + config.json)
  from_hf, to_hf              Llama, Qwen2, Mistral, DeepSeek-V2/V3 (dense layers)
"""

from models.config import LayerSpec, ModelConfig
from models.configs import get_config, list_configs
from models.decoder import DecoderLM
from models.hf import from_hf, to_hf

__all__ = [
    "ModelConfig",
    "LayerSpec",
    "DecoderLM",
    "get_config",
    "list_configs",
    "from_hf",
    "to_hf",
]
