"""Raw text examples as columns, and the error every data loader raises.

Every source (TFDS, local files, per-client folders, the synthetic generator)
produces a :class:`TextExamples`: parallel lists of model input text, target text
and example ids, plus any extra string columns (a topic, a speaker, a natural
client id) that partitioners can group by.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


class DataError(ValueError):
    """Bad or unusable input data; the message names the file (or dataset) and the problem."""


@dataclasses.dataclass(frozen=True)
class TextExamples:
    """Column-oriented text-to-text examples.

    Attributes:
      inputs: source texts (e.g. dialogues), before any prompt template.
      targets: reference texts (e.g. summaries).
      ids: one identifier per example (unique within a source).
      columns: extra string columns of the same length, e.g. ``{"intent": [...]}``.
      origin: where the examples came from (a path or ``tfds:samsum/train``), for messages.
    """

    inputs: list[str]
    targets: list[str]
    ids: list[str]
    columns: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    origin: str = "<memory>"

    def __post_init__(self):
        n = len(self.inputs)
        lengths = {"inputs": n, "targets": len(self.targets), "ids": len(self.ids)}
        lengths.update({f"columns[{k!r}]": len(v) for k, v in self.columns.items()})
        if len(set(lengths.values())) != 1:
            raise DataError(f"{self.origin}: columns have different lengths: {lengths}")

    def __len__(self) -> int:
        return len(self.inputs)

    def column(self, name: str) -> list[str]:
        """An extra column by name (``"id"``/``"input"``/``"target"`` address the main ones)."""
        builtin = {"id": self.ids, "input": self.inputs, "target": self.targets}
        if name in builtin:
            return builtin[name]
        if name not in self.columns:
            available = sorted(["id", "input", "target", *self.columns])
            raise DataError(f"{self.origin}: no column {name!r}; available columns: {available}")
        return self.columns[name]

    def select(self, indices: Sequence[int]) -> "TextExamples":
        """The examples at ``indices`` (in that order)."""
        return TextExamples(
            inputs=[self.inputs[i] for i in indices],
            targets=[self.targets[i] for i in indices],
            ids=[self.ids[i] for i in indices],
            columns={k: [v[i] for i in indices] for k, v in self.columns.items()},
            origin=self.origin,
        )

    def head(self, n: int | None) -> "TextExamples":
        """The first ``n`` examples (all of them when ``n`` is None)."""
        return self if n is None or n >= len(self) else self.select(range(n))


def concatenate(parts: Sequence[TextExamples], origin: str) -> TextExamples:
    """Concatenate sources that share the same extra columns."""
    if not parts:
        raise DataError(f"{origin}: nothing to concatenate")
    keys = set(parts[0].columns)
    for part in parts[1:]:
        if set(part.columns) != keys:
            raise DataError(
                f"{origin}: {part.origin} has columns {sorted(part.columns)}, "
                f"{parts[0].origin} has {sorted(keys)}"
            )
    return TextExamples(
        inputs=[x for p in parts for x in p.inputs],
        targets=[x for p in parts for x in p.targets],
        ids=[x for p in parts for x in p.ids],
        columns={k: [x for p in parts for x in p.columns[k]] for k in sorted(keys)},
        origin=origin,
    )


def require_nonempty(examples: TextExamples) -> TextExamples:
    """Raise a :class:`DataError` naming the source when it holds no examples."""
    if len(examples) == 0:
        raise DataError(f"{examples.origin}: the dataset is empty (0 examples)")
    return examples
