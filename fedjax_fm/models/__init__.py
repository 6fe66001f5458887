"""FLAN-T5 in Flax: config and presets, the module, HF checkpoint I/O, tokenizer, generation."""

from fedjax_fm.models.config import PRESETS, LoraConfig, T5Config, preset

__all__ = ["PRESETS", "LoraConfig", "T5Config", "preset"]

from fedjax_fm.models.hf_io import (  # noqa: E402  (HF checkpoints, engineer M2)
    CheckpointError,
    from_pretrained,
    hf_state_dict_from_params,
    load_safetensors_checked,
    params_from_hf_state_dict,
    save_pretrained,
)

__all__ += [
    "CheckpointError",
    "from_pretrained",
    "hf_state_dict_from_params",
    "load_safetensors_checked",
    "params_from_hf_state_dict",
    "save_pretrained",
]
