"""Writes the paper grid's cell files: one YAML per (model, LoRA/full, server optimiser).

    python configs/paper/generate.py          # rewrites configs/paper/<model>/<mode>-<optimiser>.yaml

Each cell file names ``base.yaml`` (the shared settings) and sets only what varies.
Server optimiser settings per cell (documented in docs/experiments.md):

* fedavg   — x <- x - eta * g with eta = 1.0 (plain weighted averaging);
* fedavgm  — eta = 1.0, server momentum 0.9;
* fedadam  — eta = 10^-1.5, beta = (0.9, 0.99), tau = 1e-2 (Reddi et al. form);
* fedadamw — FedAdam's settings plus decoupled weight decay 1e-4;
* fedyogi  — FedAdam's settings with Yogi's second moment.

A test (tests/test_config_schema.py) checks that the committed files equal what this
script writes and that every one of them validates.
"""

from __future__ import annotations

from pathlib import Path

MODELS = ("flan-t5-small", "flan-t5-base", "flan-t5-large", "flan-t5-xl")
MODES = ("lora", "full")
ADAPTIVE = {"learning_rate": 0.0316227766, "b1": 0.9, "b2": 0.99, "tau": 1.0e-2, "variant": "reddi"}
OPTIMIZERS: dict[str, dict[str, object]] = {
    "fedavg": {"learning_rate": 1.0},
    "fedavgm": {"learning_rate": 1.0, "momentum": 0.9},
    "fedadam": dict(ADAPTIVE),
    "fedadamw": {**ADAPTIVE, "weight_decay": 1.0e-4},
    "fedyogi": dict(ADAPTIVE),
}
HERE = Path(__file__).resolve().parent


def cell_text(model: str, mode: str, optimizer: str) -> str:
    lines = [
        f"# Paper grid cell: {model}, {'LoRA' if mode == 'lora' else 'full fine-tuning'}, {optimizer}.",
        "# Written by configs/paper/generate.py; edit base.yaml or the script, not this file.",
        "base: ../base.yaml",
        "model:",
        f"  name: google/{model}",
    ]
    if mode == "full":
        lines.append("lora: null")
    lines += ["federated:", "  server_optimizer:", f"    name: {optimizer}"]
    for key, value in OPTIMIZERS[optimizer].items():
        lines.append(f"    {key}: {value}")
    return "\n".join(lines) + "\n"


def cells() -> dict[Path, str]:
    """Relative path -> file text for every cell of the grid."""
    return {
        Path(model) / f"{mode}-{optimizer}.yaml": cell_text(model, mode, optimizer)
        for model in MODELS
        for mode in MODES
        for optimizer in OPTIMIZERS
    }


def main() -> None:
    for relative, text in cells().items():
        path = HERE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(cells())} cell files under {HERE}")


if __name__ == "__main__":
    main()
