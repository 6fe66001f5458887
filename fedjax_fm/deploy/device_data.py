"""A device's own training data: ``DIR/<client_id>.jsonl`` -> the simulation's round batches.

In simulation a ``client_folder`` source reads every ``DIR/<client_id>.jsonl`` and the
natural partition gives client ``k`` (its position among the sorted ids) the
examples of its file, in file order. A device holds only its own file, so it
rebuilds exactly that client's rounds itself::

    indices, weights = round_slots(arange(n), seed, round, client=k, steps·B slots, real slots)
    batches          = gather_batches(tokens, indices, weights, [steps, B])

with the same tokenizer, prompt, maximum lengths, batch size and local steps as the
config -- the same NumPy generator ``default_rng([seed, round, k])`` as simulation,
hence the same batches. With ``data.packing`` on, the device packs its own examples
with the simulation's packer (``packing.pack_round`` with the same seed, round and
position), so its packed rows are the simulation's too.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from fedjax_fm.config import ExperimentConfig
from fedjax_fm.data import batching
from fedjax_fm.data.local_files import SUFFIX_FORMATS, read_examples
from fedjax_fm.data.packing import pack_round
from fedjax_fm.data.records import DataError
from fedjax_fm.data.tokenize import tokenize_examples


def find_client_file(data_dir: str | pathlib.Path, client_id: str | None) -> tuple[str, pathlib.Path]:
    """``(client_id, path)`` of the device's file in ``data_dir``.

    With ``client_id`` None the folder must hold exactly one client file, whose stem
    is the id.
    """
    directory = pathlib.Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (the device's data folder, DIR/<client_id>.jsonl)")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS)
    if client_id is not None:
        files = [p for p in files if p.stem == client_id]
        if len(files) != 1:
            raise DataError(f"{directory}: expected one file {client_id}.jsonl (or .json/.csv), found {len(files)}")
    elif len(files) != 1:
        raise DataError(f"{directory}: holds {len(files)} client files; pass --client-id to choose one")
    return files[0].stem, files[0]


class DeviceData:
    """One client's tokenised examples and its static-shape round batches."""

    def __init__(self, cfg: ExperimentConfig, tokenizer: Any, data_dir: str | pathlib.Path,
                 client_id: str | None = None) -> None:
        source = cfg.data.source
        self.client_id, self.path = find_client_file(data_dir, client_id)
        examples = read_examples(
            self.path,
            input_field=source.input_field or "dialogue",
            target_field=source.target_field or "summary",
            id_field=source.id_field,
            skip_invalid=source.skip_invalid,
        )
        self.tokens, self.truncation = tokenize_examples(
            examples, tokenizer, prompt_template=cfg.data.prompt_template,
            max_input_length=cfg.data.max_input_length, max_target_length=cfg.data.max_target_length,
        )
        self.num_examples = len(examples)
        self.seed = cfg.seed
        self.local_work = batching.LocalWork(cfg.federated.batch_size, steps=cfg.federated.local_steps)
        self.steps = self.local_work.steps_per_round(self.num_examples)
        self.packing = cfg.data.packing_spec()

    def round_batches(self, position: int, round_index: int) -> dict[str, np.ndarray]:
        """Arrays ``[steps, B, L]`` of round ``round_index`` for the client at ``position``."""
        batch_size = self.local_work.batch_size
        if self.packing is not None:
            packed = pack_round(self.tokens, np.arange(self.num_examples), seed=self.seed,
                                round_index=int(round_index), client=int(position),
                                num_rows=self.steps * batch_size, spec=self.packing)
            return {k: v.reshape(self.steps, batch_size, *v.shape[1:]) for k, v in packed.batch.items()}
        indices, weights = batching.round_slots(
            np.arange(self.num_examples), seed=self.seed, round_index=int(round_index), client=int(position),
            num_slots=self.steps * batch_size,
            num_real=self.local_work.real_examples(self.num_examples, self.steps),
        )
        return batching.gather_batches(self.tokens, indices, weights, (self.steps, batch_size))
