"""LoRA settings (Hu et al. 2021), in a module of their own that needs no JAX.

The experiment config embeds :class:`LoraConfig` as its ``lora:`` section, and a
config must load quickly (a Flower device parses it for every message), so this
module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

LoraTarget = Literal["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]  # projections LoRA may adapt


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation settings (Hu et al. 2021), PEFT's conventions.

    A frozen projection ``y = x W`` becomes ``y = x W + (alpha / rank) * dropout(x) A B``
    with ``A`` [in, rank] random and ``B`` [rank, out] zero at initialisation.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[LoraTarget, ...] = ("q", "v")

    def __post_init__(self) -> None:
        valid = typing.get_args(LoraTarget)
        bad = [m for m in self.target_modules if m not in valid]
        if bad:
            raise ValueError(f"unknown LoRA target module(s) {bad}; valid: {sorted(valid)}")
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
