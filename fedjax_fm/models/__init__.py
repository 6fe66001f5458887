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

from fedjax_fm.models.generate import generate  # noqa: E402  (model, engineer M1)
from fedjax_fm.models.loss import batch_loss, seq2seq_cross_entropy, shift_right  # noqa: E402
from fedjax_fm.models.t5 import T5, init_params  # noqa: E402

__all__ += ["T5", "batch_loss", "generate", "init_params", "seq2seq_cross_entropy", "shift_right"]

from fedjax_fm.models.lora import (  # noqa: E402  (LoRA adapters, engineer F)
    init_lora,
    load_peft_adapter,
    merge_lora,
    save_peft_adapter,
)

__all__ += ["init_lora", "load_peft_adapter", "merge_lora", "save_peft_adapter"]

from fedjax_fm.models.tokenizer import load_tokenizer, train_sentencepiece_tokenizer  # noqa: E402  (engineer M2)

__all__ += ["load_tokenizer", "train_sentencepiece_tokenizer"]
