"""fedjax_fm: federated fine-tuning of FLAN-T5 in pure functional JAX.

Subpackages: ``models`` (Flax T5, LoRA, HF checkpoints, tokenizer, generation),
``data`` (sources, partitioners, static batches), ``fl`` (client update,
aggregation, server optimisers, algorithms, execution backends), ``energy``
(power sampling, FLOPs/MFU, communication), ``eval`` (ROUGE, loss).
"""

__version__ = "0.1.0"
