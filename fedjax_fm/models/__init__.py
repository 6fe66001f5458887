"""FLAN-T5 in Flax: config and presets, the module, HF checkpoint I/O, tokenizer, generation."""

from fedjax_fm.models.config import PRESETS, LoraConfig, T5Config, preset

__all__ = ["PRESETS", "LoraConfig", "T5Config", "preset"]
