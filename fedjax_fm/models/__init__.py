"""FLAN-T5 in Flax: config and presets, the module, HF checkpoint I/O, tokenizer, generation.

The public names below are imported on first use (PEP 562), so that importing the
JAX-free ``fedjax_fm.models.lora_config`` (as the experiment config does) does not load
Flax, transformers and the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("PRESETS", "T5Config", "preset"), "config"),
    "LoraConfig": "lora_config",
    **dict.fromkeys(("HFCheckpointError", "from_pretrained", "hf_state_dict_from_params", "load_safetensors_checked",
                     "params_from_hf_state_dict", "save_pretrained"), "hf_io"),
    "generate": "generate",
    **dict.fromkeys(("batch_loss", "seq2seq_cross_entropy", "shift_right"), "loss"),
    **dict.fromkeys(("T5", "init_params"), "t5"),
    **dict.fromkeys(("init_lora", "load_peft_adapter", "merge_lora", "save_peft_adapter"), "lora"),
    **dict.fromkeys(("load_tokenizer", "train_sentencepiece_tokenizer"), "tokenizer"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedjax_fm.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedjax_fm.models.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
