"""Summarisation data for federated clients: sources, prompts, tokenisation, partitioners, static batches.

The runner's entry point is :func:`build_federated_data` with a :class:`DataSpec`;
the pieces it composes are public too (see ``docs/data.md``).
"""

from fedjax_fm.data.batching import LocalWork, eval_batches, gather_batches, real_examples_per_round, round_slots
from fedjax_fm.data.federated import (
    ClientPartitionSpec,
    DataSpec,
    FederatedData,
    SourceSpec,
    build_federated_data,
    load_source,
    partition_examples,
    prefetch_round_batches,
)
from fedjax_fm.data.local_files import read_client_folder, read_examples, write_jsonl
from fedjax_fm.data.packing import (
    PackedRows,
    PackingSpec,
    pack_examples,
    pack_round,
    packed_example_count,
    padding_efficiency,
    rows_needed,
)
from fedjax_fm.data.partition import (
    Partition,
    dirichlet_group_partition,
    dirichlet_quantity_partition,
    enforce_min_examples,
    iid_partition,
    length_buckets,
    natural_partition,
)
from fedjax_fm.data.records import DataError, TextExamples
from fedjax_fm.data.synthetic import synthetic_dialogue, synthetic_examples
from fedjax_fm.data.synthetic_tokenizer import synthetic_corpus, synthetic_tokenizer
from fedjax_fm.data.tfds_source import TFDS_FIELDS, load_tfds, prepare_tfds
from fedjax_fm.data.tokenize import (
    DEFAULT_PROMPT,
    TokenizedExamples,
    TruncationReport,
    cached_tokenize,
    format_prompts,
    tokenize_examples,
)

__all__ = [
    "DEFAULT_PROMPT", "DataError", "DataSpec", "FederatedData", "LocalWork", "Partition", "ClientPartitionSpec",
    "SourceSpec", "TFDS_FIELDS", "TextExamples", "TokenizedExamples", "TruncationReport", "build_federated_data",
    "cached_tokenize", "dirichlet_group_partition", "dirichlet_quantity_partition", "enforce_min_examples",
    "eval_batches", "format_prompts", "gather_batches", "iid_partition", "length_buckets", "load_source",
    "load_tfds", "natural_partition", "partition_examples", "prefetch_round_batches", "prepare_tfds", "read_client_folder", "read_examples",
    "real_examples_per_round", "round_slots", "synthetic_corpus", "synthetic_dialogue", "synthetic_examples",
    "synthetic_tokenizer", "tokenize_examples", "write_jsonl",
    "PackedRows", "PackingSpec", "pack_examples", "pack_round", "packed_example_count", "padding_efficiency",
    "rows_needed",
]
