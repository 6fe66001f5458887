"""Seeded partitioners: which examples each federated client holds.

Each returns a :class:`Partition`: client ids and, per client, an index array into the
dataset. Every partitioner is a pure function of its inputs and ``seed`` (NumPy
``default_rng([seed, tag])``), so the same call gives the same split.

* IID: a uniform random permutation cut into ``K`` near-equal parts (sizes differ by <= 1).
* Dirichlet quantity skew: client shares ``p ~ Dir(alpha * 1_K)``; client ``k`` gets
  ``round(p_k * N)`` examples (largest-remainder rounding, so sizes sum to ``N``), drawn
  uniformly at random. Small ``alpha`` -> a few large clients; ``alpha -> inf`` -> IID.
* Dirichlet content skew over a grouping key (Hsu et al., 2019): for each group ``g``
  (topic, intent, label or length bucket) draw ``q_g ~ Dir(alpha * 1_K)`` and split that
  group's shuffled examples among clients in proportions ``q_g``. Small ``alpha`` -> each
  client sees few groups; large ``alpha`` -> every client sees every group in proportion.
* Natural: one client per distinct value of a field (e.g. the file a per-client folder
  held, or a user/speaker id).

A minimum size per client is checked by :func:`enforce_min_examples`: an error by
default, or the small clients are dropped with a warning when asked.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import numpy as np

from fedjax_fm.data.records import DataError


@dataclasses.dataclass(frozen=True)
class Partition:
    """Per-client example indices (disjoint; their union is the partitioned dataset)."""

    method: str
    client_ids: list[str]
    client_indices: list[np.ndarray]
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    groups: list[str] | None = None  # the grouping key per example, for the report

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def counts(self) -> dict[str, int]:
        return {c: int(len(i)) for c, i in zip(self.client_ids, self.client_indices)}

    def report(self) -> dict[str, Any]:
        """Per-client counts and their summary (plus per-client group counts when grouped)."""
        counts = np.array([len(i) for i in self.client_indices], dtype=np.int64)
        report: dict[str, Any] = {
            "method": self.method,
            "num_clients": self.num_clients,
            "num_examples": int(counts.sum()),
            "min": int(counts.min()) if counts.size else 0,
            "max": int(counts.max()) if counts.size else 0,
            "mean": float(counts.mean()) if counts.size else 0.0,
            "std": float(counts.std()) if counts.size else 0.0,
            "counts": self.counts(),
            "dropped": dict(self.dropped),
        }
        if self.groups is not None:
            groups = np.asarray(self.groups)
            report["group_counts"] = {
                c: dict(zip(*(x.tolist() for x in np.unique(groups[i], return_counts=True))))
                for c, i in zip(self.client_ids, self.client_indices)
            }
        return report


def _client_names(num_clients: int) -> list[str]:
    width = len(str(max(num_clients - 1, 0)))
    return [f"client_{k:0{width}d}" for k in range(num_clients)]


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < 1:
        raise DataError("cannot partition an empty dataset")


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``shares * total`` (Hamilton's method)."""
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    # Ties broken by index (stable sort) so the result is deterministic.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


def _split(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


def iid_partition(num_examples: int, num_clients: int, *, seed: int) -> Partition:
    """Uniformly random, near-equal split of ``range(num_examples)`` over ``num_clients``."""
    _check_num_clients(num_clients, num_examples)
    perm = np.random.default_rng([seed, 0]).permutation(num_examples)
    return Partition("iid", _client_names(num_clients), [np.sort(p) for p in np.array_split(perm, num_clients)])


def dirichlet_quantity_partition(num_examples: int, num_clients: int, alpha: float, *, seed: int) -> Partition:
    """Client sizes from ``Dir(alpha)`` shares; examples themselves assigned uniformly."""
    _check_num_clients(num_clients, num_examples)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 1])
    shares = rng.dirichlet(np.full(num_clients, float(alpha)))
    counts = _largest_remainder(shares, num_examples)
    perm = rng.permutation(num_examples)
    return Partition(f"dirichlet_quantity(alpha={alpha})", _client_names(num_clients),
                     [np.sort(p) for p in _split(perm, counts)])


def dirichlet_group_partition(groups: Sequence[str], num_clients: int, alpha: float, *, seed: int) -> Partition:
    """Per-group ``Dir(alpha)`` proportions over clients (content / label skew)."""
    groups = [str(g) for g in groups]
    _check_num_clients(num_clients, len(groups))
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 2])
    labels = np.asarray(groups)
    per_client: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for group in sorted(set(groups)):  # sorted: independent of the order groups first appear
        members = rng.permutation(np.flatnonzero(labels == group))
        counts = _largest_remainder(rng.dirichlet(np.full(num_clients, float(alpha))), len(members))
        for k, part in enumerate(_split(members, counts)):
            per_client[k].append(part)
    indices = [np.sort(np.concatenate(parts)) for parts in per_client]
    return Partition(f"dirichlet_group(alpha={alpha})", _client_names(num_clients), indices, groups=groups)


def natural_partition(keys: Sequence[str], *, num_clients: int | None = None, seed: int = 0,
                      field: str = "client") -> Partition:
    """One client per distinct key, ids = the keys, in sorted order.

    With ``num_clients`` smaller than the number of keys, a seeded random subset of the
    natural clients is kept (the rest are reported as dropped); asking for more is an error.
    """
    keys = [str(k) for k in keys]
    if not keys:
        raise DataError("cannot partition an empty dataset")
    labels = np.asarray(keys)
    names = sorted(set(keys))
    dropped: dict[str, int] = {}
    if num_clients is not None:
        if num_clients > len(names):
            raise DataError(f"natural partition by {field!r}: asked for {num_clients} clients "
                            f"(federated.num_clients), the data has {len(names)}; set federated.num_clients "
                            f"to at most {len(names)}")
        keep = np.sort(np.random.default_rng([seed, 3]).choice(len(names), size=num_clients, replace=False))
        kept = set(keep.tolist())
        dropped = {n: int((labels == n).sum()) for i, n in enumerate(names) if i not in kept}
        names = [names[i] for i in keep]
    return Partition(f"natural({field})", names, [np.flatnonzero(labels == n) for n in names], dropped=dropped)


def length_buckets(lengths: Sequence[int], num_buckets: int) -> list[str]:
    """Quantile buckets of lengths (``"len_q0"`` shortest ... ``"len_q{n-1}"``) as a grouping key."""
    lengths = np.asarray(lengths)
    edges = np.quantile(lengths, np.linspace(0, 1, num_buckets + 1)[1:-1])
    return [f"len_q{b}" for b in np.searchsorted(edges, lengths, side="right")]


def enforce_min_examples(partition: Partition, min_examples: int, *, drop: bool = False) -> Partition:
    """Raise if a client holds fewer than ``min_examples``; or drop those clients with a warning."""
    small = {c: int(len(i)) for c, i in zip(partition.client_ids, partition.client_indices) if len(i) < min_examples}
    if not small:
        return partition
    shown = dict(list(small.items())[:10])
    if not drop:
        raise DataError(
            f"partition {partition.method}: {len(small)} client(s) hold fewer than {min_examples} examples "
            f"(e.g. {shown}); lower min_examples, raise alpha, use fewer clients, or set drop_small_clients"
        )
    keep = [k for k, c in enumerate(partition.client_ids) if c not in small]
    if not keep:
        raise DataError(f"partition {partition.method}: every client holds fewer than {min_examples} examples")
    warnings.warn(f"partition {partition.method}: dropped {len(small)} client(s) with < {min_examples} examples: {shown}")
    return dataclasses.replace(
        partition,
        client_ids=[partition.client_ids[k] for k in keep],
        client_indices=[partition.client_indices[k] for k in keep],
        dropped={**partition.dropped, **small},
    )
