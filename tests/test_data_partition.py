"""Partitioner properties: disjoint, complete, seeded, and skew that follows alpha."""

import numpy as np
import pytest

from fedjax_fm.data import (
    DataError,
    dirichlet_group_partition,
    dirichlet_quantity_partition,
    enforce_min_examples,
    iid_partition,
    length_buckets,
    natural_partition,
)

N, K = 600, 8
GROUPS = [f"topic{i % 6}" for i in range(N)]


def _all(p):
    return np.concatenate(p.client_indices)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: iid_partition(N, K, seed=seed),
        lambda seed: dirichlet_quantity_partition(N, K, 0.5, seed=seed),
        lambda seed: dirichlet_group_partition(GROUPS, K, 0.5, seed=seed),
    ],
    ids=["iid", "dirichlet_quantity", "dirichlet_group"],
)
def test_partitions_are_disjoint_complete_and_seeded(make):
    p = make(0)
    everything = _all(p)
    assert len(everything) == N  # complete ...
    assert len(np.unique(everything)) == N  # ... and disjoint
    assert sorted(everything.tolist()) == list(range(N))
    assert p.num_clients == K and sum(p.counts().values()) == N
    same = make(0)
    assert all(np.array_equal(a, b) for a, b in zip(p.client_indices, same.client_indices))
    other = make(1)
    assert not all(np.array_equal(a, b) for a, b in zip(p.client_indices, other.client_indices))


def test_iid_sizes_differ_by_at_most_one():
    counts = np.array(list(iid_partition(N + 3, K, seed=0).counts().values()))
    assert counts.max() - counts.min() <= 1


def _size_spread(alpha, seed):
    counts = np.array(list(dirichlet_quantity_partition(N, K, alpha, seed=seed).counts().values()))
    return counts.std() / counts.mean()


def test_dirichlet_quantity_skew_follows_alpha():
    large = np.mean([_size_spread(1e4, s) for s in range(5)])
    small = np.mean([_size_spread(0.1, s) for s in range(5)])
    assert large < 0.05  # near-equal sizes, as IID
    assert small > 0.8  # a few clients hold most examples


def _group_skew(alpha, seed):
    """Mean total-variation distance between each client's topic mix and the global mix."""
    p = dirichlet_group_partition(GROUPS, K, alpha, seed=seed)
    labels = np.asarray(GROUPS)
    topics = sorted(set(GROUPS))
    global_mix = np.array([np.mean(labels == t) for t in topics])
    distances = []
    for idx in p.client_indices:
        if len(idx):
            mix = np.array([np.mean(labels[idx] == t) for t in topics])
            distances.append(0.5 * np.abs(mix - global_mix).sum())
    return np.mean(distances)


def test_dirichlet_group_skew_follows_alpha():
    assert _group_skew(1e4, 0) < 0.05
    assert _group_skew(0.05, 0) > 0.5
    report = dirichlet_group_partition(GROUPS, K, 0.05, seed=0).report()
    assert set(report["group_counts"]) == {f"client_{k}" for k in range(K)}


def test_natural_partition_by_key_and_subset():
    keys = ["b", "a", "b", "c", "a", "b"]
    p = natural_partition(keys)
    assert p.client_ids == ["a", "b", "c"]
    assert [i.tolist() for i in p.client_indices] == [[1, 4], [0, 2, 5], [3]]
    sub = natural_partition(keys, num_clients=2, seed=3)
    assert len(sub.client_ids) == 2 and sum(sub.dropped.values()) + sum(sub.counts().values()) == len(keys)
    with pytest.raises(DataError, match=r"asked for 4 clients \(federated.num_clients\), the data has 3"):
        natural_partition(keys, num_clients=4)


def test_min_examples_error_or_drop_with_warning():
    p = natural_partition(["a", "b", "b", "c", "c", "c"])
    with pytest.raises(DataError, match="fewer than 2 examples"):
        enforce_min_examples(p, 2)
    with pytest.warns(UserWarning, match="dropped 1 client"):
        kept = enforce_min_examples(p, 2, drop=True)
    assert kept.client_ids == ["b", "c"] and kept.report()["dropped"] == {"a": 1}


def test_length_buckets_are_quantiles():
    buckets = length_buckets(np.arange(100), 4)
    assert [buckets.count(f"len_q{q}") for q in range(4)] == [25, 25, 25, 25]


def test_bad_partition_arguments():
    with pytest.raises(DataError, match="alpha must be > 0"):
        dirichlet_quantity_partition(10, 2, 0.0, seed=0)
    with pytest.raises(DataError, match="empty dataset"):
        iid_partition(0, 2, seed=0)
