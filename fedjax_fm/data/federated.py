"""The runner's entry point: a data spec -> tokenised, partitioned, batch-ready client data.

``build_federated_data(spec, tokenizer, seed=..., num_clients=..., local_work=...)`` loads the source,
tokenises train and eval splits once (optionally cached on disk), partitions the train
split, checks client sizes, and returns a :class:`FederatedData` whose
``client_round_batches(client, round)`` is a numpy gather of ``[steps, B, L]`` arrays.

The spec is three small dataclasses (``DataSpec`` holding a ``SourceSpec`` and a
``ClientPartitionSpec``): the ``data:`` block of an experiment config, which validates
their keys (:mod:`fedjax_fm.config`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from fedjax_fm.data import batching, partition as partitioners
from fedjax_fm.data.local_files import read_client_folder, read_examples
from fedjax_fm.data.packing import PACKED_KEYS, PackingSpec, pack_round
from fedjax_fm.data.records import DataError, TextExamples
from fedjax_fm.data.synthetic import synthetic_examples
from fedjax_fm.data.tokenize import DEFAULT_PROMPT, OnDemandTokens, TokenizedExamples, TruncationReport, cached_tokenize

SourceKind = Literal["synthetic", "tfds", "samsum_json", "file", "client_folder"]
PartitionMethod = Literal["iid", "dirichlet_quantity", "dirichlet_group", "natural"]
SAMSUM_FILES = {"train": "train.json", "validation": "val.json", "test": "test.json"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where the examples come from.

    kind:
      ``synthetic``: the seeded dialogue generator (``num_train``/``num_eval`` examples,
        ``lengths``: ``samsum`` = SAMSum's spread of 3-30 utterances, ``small_talk`` =
        the older short dialogues with ``small_talk_turns`` exchanges; ``extra_fact_prob``);
        column ``intent`` for content skew.
      ``tfds``: TFDS builder ``name`` (``data_dir``, ``manual_dir``, ``train_split``,
        ``eval_split``; fields default to the built-in mapping for samsum, cnn_dailymail,
        xsum, billsum).
      ``samsum_json``: a directory ``path`` holding SAMSum's ``train.json``/``val.json``/``test.json``.
      ``file``: one JSON/JSONL/CSV file ``path`` (train) and ``eval_path``.
      ``client_folder``: ``path`` = ``DIR/<client_id>.jsonl`` files; column ``client``;
        ``eval_path`` a file or another client folder (pooled for evaluation).

    For ``file`` and ``client_folder`` without an ``eval_path``, ``eval_fraction`` holds
    out that seeded random fraction of the examples for evaluation instead.
    """

    kind: SourceKind = "synthetic"
    path: str | None = None
    eval_path: str | None = None
    input_field: str | None = None
    target_field: str | None = None
    id_field: str | None = "id"
    extra_fields: tuple[str, ...] = ()
    skip_invalid: bool = False
    name: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    num_train: int = 2000
    num_eval: int = 200
    small_talk_turns: tuple[int, int] = (0, 2)
    extra_fact_prob: float = 0.3
    lengths: Literal["samsum", "small_talk"] = "samsum"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class ClientPartitionSpec:
    """How train examples are split over clients.

    ``group_field`` names the column for ``dirichlet_group`` (``"length_bucket"`` groups by
    input-length quantile into ``num_length_buckets``); ``natural_field`` the column for
    ``natural`` (``"client"`` for a client folder). Clients below ``min_examples`` are an
    error unless ``drop_small_clients``.
    """

    method: PartitionMethod = "iid"
    alpha: float = 0.5
    group_field: str | None = None
    num_length_buckets: int = 4
    natural_field: str = "client"
    min_examples: int = 1
    drop_small_clients: bool = False


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """``data.packing``: several examples per training row (``docs/data.md``, "Packing").

    With ``enabled``, a local step is ``federated.batch_size`` packed *rows* of
    ``input_length`` source and ``target_length`` target slots (defaults: the
    truncation limits ``max_input_length`` / ``max_target_length``, which stay
    truncation limits); each row holds as many whole examples as first-fit places in
    it (at most ``max_segments``), shuffled in windows of ``window`` examples.
    """

    enabled: bool = False
    input_length: int | None = None
    target_length: int | None = None
    max_segments: int | None = None
    window: int | None = 256

    def spec(self, max_input_length: int, max_target_length: int) -> PackingSpec:
        return PackingSpec(self.input_length or max_input_length, self.target_length or max_target_length,
                           max_segments=self.max_segments, window=self.window)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The ``data:`` section of an experiment: where examples come from, how they are
    prompted, truncated and split over clients.

    The experiment config (:class:`fedjax_fm.config.ExperimentConfig`) embeds this class,
    so these defaults *are* the config's and there is one definition of each setting.
    How much local work a client does per round (batch size, local steps or epochs) is
    the ``federated`` section's and reaches the data as a :class:`~fedjax_fm.data.batching.LocalWork`;
    the evaluation batch size is the ``eval`` section's.
    ``cache_dir``: where tokenised arrays are cached (none: tokenise every run).
    """

    source: SourceSpec = dataclasses.field(default_factory=SourceSpec)
    partition: ClientPartitionSpec = dataclasses.field(default_factory=ClientPartitionSpec)
    prompt_template: str = DEFAULT_PROMPT
    max_input_length: int = 512
    max_target_length: int = 95
    cache_dir: str | None = None
    packing: PackingConfig = dataclasses.field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        if self.packing.enabled:
            spec = self.packing_spec()  # checks the geometry
            if spec.input_length < self.max_input_length or spec.target_length < self.max_target_length:
                raise DataError(
                    f"data.packing rows ({spec.input_length}, {spec.target_length}) must be at least the truncation "
                    f"limits max_input_length/max_target_length ({self.max_input_length}, {self.max_target_length}), "
                    "so that every example fits in an empty row"
                )
        for key in ("max_input_length", "max_target_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataError(f"data.{key} must be positive, got {value!r}")
        if not self.partition.alpha > 0:
            raise DataError(f"data.partition.alpha must be positive, got {self.partition.alpha}")
        if self.source.kind == "tfds" and not self.source.name:
            raise DataError("data.source.name (a TFDS builder, e.g. 'samsum') is required when data.source.kind is 'tfds'")
        if self.source.kind in ("samsum_json", "file", "client_folder") and not self.source.path:
            raise DataError(f"data.source.path is required when data.source.kind is {self.source.kind!r}")
        for key in ("num_train", "num_eval"):
            if self.source.kind == "synthetic" and getattr(self.source, key) <= 0:
                raise DataError(f"data.source.{key} must be positive, got {getattr(self.source, key)}")

    def packing_spec(self) -> PackingSpec | None:
        """The :class:`PackingSpec` of ``packing`` (None when packing is off)."""
        if not self.packing.enabled:
            return None
        return self.packing.spec(self.max_input_length, self.max_target_length)


# ---------------------------------------------------------------------------------------
# Loading


def _file_kwargs(source: SourceSpec, extra: Sequence[str]) -> dict[str, Any]:
    return dict(
        input_field=source.input_field or "dialogue",
        target_field=source.target_field or "summary",
        id_field=source.id_field,
        extra_fields=tuple(dict.fromkeys([*source.extra_fields, *extra])),
        skip_invalid=source.skip_invalid,
    )


def _read_path(path: str, source: SourceSpec, extra: Sequence[str]) -> TextExamples:
    if pathlib.Path(path).is_dir():
        return read_client_folder(path, **_file_kwargs(source, extra))
    return read_examples(path, **_file_kwargs(source, extra))


def load_source(source: SourceSpec, *, seed: int, partition_columns: Sequence[str] = ()) -> tuple[TextExamples, TextExamples]:
    """(train, eval) examples of a source, with the columns partitioning will need."""
    # Columns the partitioner groups by that the reader must keep (built-in ones excluded).
    builtin = {"id", "input", "target", "length_bucket"} | ({"client"} if source.kind == "client_folder" else set())
    wanted = [c for c in partition_columns if c not in builtin]
    if source.kind == "synthetic":
        common = dict(small_talk_turns=tuple(source.small_talk_turns), extra_fact_prob=source.extra_fact_prob,
                      lengths=source.lengths)
        # Distinct seeds keep eval dialogues out of the training set's random stream.
        train = synthetic_examples(source.num_train, seed=seed, id_prefix="train", **common)
        evaluation = synthetic_examples(source.num_eval, seed=seed + 1_000_003, id_prefix="eval", **common)
    elif source.kind == "tfds":
        from fedjax_fm.data.tfds_source import load_tfds

        if not source.name:
            raise DataError("data.source: kind 'tfds' needs a builder name (source.name)")
        common = dict(
            input_field=source.input_field, target_field=source.target_field,
            extra_fields=tuple(dict.fromkeys([*source.extra_fields, *wanted])),
            data_dir=source.data_dir, manual_dir=source.manual_dir,
        )
        train = load_tfds(source.name, source.train_split, max_examples=source.max_train_examples, **common)
        evaluation = load_tfds(source.name, source.eval_split, max_examples=source.max_eval_examples, **common)
    elif source.kind == "samsum_json":
        if not source.path:
            raise DataError("data.source: kind 'samsum_json' needs path (the directory with train.json, val.json, test.json)")
        split_files = {s: pathlib.Path(source.path) / f for s, f in SAMSUM_FILES.items()}
        for split in (source.train_split, source.eval_split):
            if split not in split_files:
                raise DataError(f"{source.path}: SAMSum splits are {sorted(split_files)}, not {split!r}")
        kwargs = _file_kwargs(source, wanted)
        train = read_examples(split_files[source.train_split], **kwargs)
        evaluation = read_examples(split_files[source.eval_split], **kwargs)
    elif source.kind in ("file", "client_folder"):
        if not source.path:
            raise DataError(f"data.source: kind {source.kind!r} needs path")
        if source.kind == "client_folder":
            train = read_client_folder(source.path, **_file_kwargs(source, wanted))
        else:
            train = _read_path(source.path, source, wanted)
        if source.eval_path:
            evaluation = _read_path(source.eval_path, source, [])
        elif source.eval_fraction is not None:
            train, evaluation = _hold_out(train, source.eval_fraction, seed=seed)
        else:
            raise DataError(f"data.source: kind {source.kind!r} needs eval_path (a held-out file or folder) "
                            "or eval_fraction")
    else:
        raise DataError(f"data.source: unknown kind {source.kind!r}; use synthetic, tfds, samsum_json, file, client_folder")
    return train.head(source.max_train_examples), evaluation.head(source.max_eval_examples)


def _hold_out(examples: TextExamples, fraction: float, *, seed: int) -> tuple[TextExamples, TextExamples]:
    """Split off a seeded random ``fraction`` (at least one example) as the eval set."""
    if not 0 < fraction < 1:
        raise DataError(f"data.source.eval_fraction must be in (0, 1), got {fraction}")
    n = len(examples)
    num_eval = max(1, int(round(fraction * n)))
    if num_eval >= n:
        raise DataError(f"{examples.origin}: eval_fraction={fraction} of {n} examples leaves nothing to train on")
    order = np.random.default_rng([seed, 4]).permutation(n)
    return examples.select(np.sort(order[num_eval:])), examples.select(np.sort(order[:num_eval]))


def partition_examples(examples: TextExamples, tokens: TokenizedExamples, spec: ClientPartitionSpec, *,
                       seed: int, num_clients: int | None) -> partitioners.Partition:
    """Apply the configured partitioner, then the minimum-size rule."""
    n = len(examples)
    if spec.method == "natural":
        result = partitioners.natural_partition(examples.column(spec.natural_field), num_clients=num_clients,
                                                seed=seed, field=spec.natural_field)
    else:
        if num_clients is None:
            raise DataError(f"partition {spec.method!r} needs num_clients")
        if spec.method == "iid":
            result = partitioners.iid_partition(n, num_clients, seed=seed)
        elif spec.method == "dirichlet_quantity":
            result = partitioners.dirichlet_quantity_partition(n, num_clients, spec.alpha, seed=seed)
        elif spec.method == "dirichlet_group":
            if not spec.group_field:
                raise DataError("partition 'dirichlet_group' needs group_field (e.g. intent, topic, length_bucket)")
            if spec.group_field == "length_bucket":
                groups = partitioners.length_buckets(tokens.input_lengths, spec.num_length_buckets)
            else:
                groups = examples.column(spec.group_field)
            result = partitioners.dirichlet_group_partition(groups, num_clients, spec.alpha, seed=seed)
        else:
            raise DataError(f"unknown partition method {spec.method!r}; use iid, dirichlet_quantity, dirichlet_group, natural")
    return partitioners.enforce_min_examples(result, spec.min_examples, drop=spec.drop_small_clients)


# ---------------------------------------------------------------------------------------
# The runner-facing object


@dataclasses.dataclass
class FederatedData:
    """Partitioned, tokenised client data with static-shape round batches.

    Clients are addressed by position ``0 .. num_clients-1`` (the integer that seeds their
    shuffling) or by id string.

    ``train_fill`` / ``eval_fill``: set when a split is tokenised on demand
    (``build_federated_data(..., on_demand=True)``, a multi-process run): its token arrays
    are then filled as clients are fed (and the eval split when it is first batched), and
    ``truncation`` reports the examples tokenised so far.
    """

    client_ids: list[str]
    partition: partitioners.Partition
    train_tokens: TokenizedExamples
    eval_tokens: TokenizedExamples
    eval_examples: TextExamples
    local_work: batching.LocalWork
    steps_per_round: int
    seed: int
    eval_batch_size: int
    truncation_reports: dict[str, TruncationReport]
    packing: PackingSpec | None = None
    train_fill: OnDemandTokens | None = None
    eval_fill: OnDemandTokens | None = None

    @property
    def truncation(self) -> dict[str, TruncationReport]:
        """Per split, the truncation report (of the examples tokenised so far, on demand)."""
        reports = dict(self.truncation_reports)
        for split, fill in (("train", self.train_fill), ("eval", self.eval_fill)):
            if fill is not None:
                reports[split] = fill.report()
        return reports

    def ensure_examples(self, indices: Sequence[int] | np.ndarray) -> None:
        """Makes sure the training examples at ``indices`` are tokenised (a no-op unless on demand)."""
        if self.train_fill is not None:
            self.train_fill.ensure(indices)

    def _ensure_clients(self, clients: Sequence[int | str]) -> None:
        if self.train_fill is not None:
            self.train_fill.ensure(np.concatenate(
                [np.asarray(self.partition.client_indices[self._position(c)], np.int64) for c in clients]))

    def client_tokens(self, client: int | str) -> dict[str, np.ndarray]:
        """A client's tokenised training examples ``{"input_ids", "labels"}`` (what its lineage fingerprint covers)."""
        self._ensure_clients([client])
        indices = np.asarray(self.partition.client_indices[self._position(client)])
        return {"input_ids": self.train_tokens.input_ids[indices], "labels": self.train_tokens.labels[indices]}

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def batch_size(self) -> int:
        return self.local_work.batch_size

    def _position(self, client: int | str) -> int:
        if isinstance(client, str):
            try:
                return self.client_ids.index(client)
            except ValueError:
                raise DataError(f"unknown client id {client!r}") from None
        if not 0 <= int(client) < self.num_clients:
            raise DataError(f"client index {client} out of range [0, {self.num_clients})")
        return int(client)

    def num_examples(self, client: int | str) -> int:
        """The client's dataset size ``n_c`` (FedAvg's aggregation weight)."""
        return int(len(self.partition.client_indices[self._position(client)]))

    def real_examples_per_round(self, client: int | str) -> int:
        """Real (weight 1) examples in each of the client's rounds: ``sum(example_weight)``."""
        return self.local_work.real_examples(self.num_examples(client), self.steps_per_round)

    def _slots(self, client: int | str, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._position(client)
        num_slots = self.steps_per_round * self.batch_size
        return batching.round_slots(
            self.partition.client_indices[k], seed=self.seed, round_index=int(round_index), client=k,
            num_slots=num_slots, num_real=self.real_examples_per_round(k),
        )

    def _packed(self, client: int | str, round_index: int) -> dict[str, np.ndarray]:
        """One client's packed round ``[steps, R, L]`` (``packing.pack_round``; module docs)."""
        k = self._position(client)
        self._ensure_clients([k])
        epochs = self.local_work.epochs
        packed = pack_round(
            self.train_tokens, self.partition.client_indices[k], seed=self.seed, round_index=int(round_index),
            client=k, num_rows=self.steps_per_round * self.batch_size, spec=self.packing,
            num_examples=None if epochs is None else max(1, round(epochs * self.num_examples(k))),
        )
        shape = (self.steps_per_round, self.batch_size)
        return {key: v.reshape(*shape, *v.shape[1:]) for key, v in packed.batch.items()}

    def client_round_batches(self, client: int | str, round_index: int) -> dict[str, np.ndarray]:
        """One client's round: arrays ``[steps, B, L]`` (``example_weight`` ``[steps, B]``).

        With packing, ``B`` counts packed rows (``docs/data.md``, "Packing")."""
        if self.packing is not None:
            return self._packed(client, round_index)
        self._ensure_clients([client])
        indices, weights = self._slots(client, round_index)
        return batching.gather_batches(self.train_tokens, indices, weights, (self.steps_per_round, self.batch_size))

    def clients_round_batches(self, clients: Sequence[int | str], round_index: int) -> dict[str, np.ndarray]:
        """A group of clients stacked for vmapped execution: arrays ``[C, steps, B, L]``."""
        if self.packing is not None:
            rounds = [self._packed(c, round_index) for c in clients]
            return {key: np.stack([r[key] for r in rounds]) for key in rounds[0]}
        self._ensure_clients(clients)
        slots = [self._slots(c, round_index) for c in clients]
        indices = np.concatenate([s[0] for s in slots])
        weights = np.concatenate([s[1] for s in slots])
        return batching.gather_batches(self.train_tokens, indices, weights,
                                       (len(slots), self.steps_per_round, self.batch_size))

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one client's round (prepend ``C`` for a client group)."""
        s, b = self.steps_per_round, self.batch_size
        src, tgt = self.train_tokens.input_ids.shape[1], self.train_tokens.labels.shape[1]
        if self.packing is not None:
            src, tgt = self.packing.input_length, self.packing.target_length
        shapes = {"input_ids": (s, b, src), "attention_mask": (s, b, src), "decoder_input_ids": (s, b, tgt),
                  "labels": (s, b, tgt), "decoder_attention_mask": (s, b, tgt), "example_weight": (s, b)}
        if self.packing is not None:
            shapes.update({key: (s, b, src if key.startswith("encoder") else tgt) for key in PACKED_KEYS})
        return shapes

    def eval_batches(self, batch_size: int | None = None, max_examples: int | None = None,
                     by_length: bool = False) -> Iterator[dict]:
        """Fixed-shape eval batches ``[B, L]`` with ``references`` and ``ids`` (padding at weight 0);
        ``by_length``: sorted by source length and cut to a few widths (``batching.eval_batches``)."""
        n = len(self.eval_tokens) if max_examples is None else min(max_examples, len(self.eval_tokens))
        if self.eval_fill is not None:
            self.eval_fill.ensure(np.arange(n))
        t = self.eval_tokens
        tokens = TokenizedExamples(t.input_ids[:n], t.input_lengths[:n], t.labels[:n], t.label_lengths[:n])
        return batching.eval_batches(tokens, self.eval_examples.targets[:n], batch_size or self.eval_batch_size,
                                     ids=self.eval_examples.ids[:n], by_length=by_length)

    def report(self) -> dict[str, Any]:
        """Partition counts, truncation counts and batch geometry, for logs and summary.json."""
        return {
            "partition": self.partition.report(),
            "truncation": {k: v.as_dict() for k, v in self.truncation.items()},
            "tokenised_on_demand": [split for split, fill in (("train", self.train_fill), ("eval", self.eval_fill))
                                    if fill is not None],
            "steps_per_round": self.steps_per_round,
            "batch_size": self.batch_size,
            "num_eval_examples": len(self.eval_tokens),
            "packing": None if self.packing is None else dataclasses.asdict(self.packing),
        }


def build_federated_data(
    spec: DataSpec,
    tokenizer,
    *,
    seed: int,
    local_work: batching.LocalWork,
    eval_batch_size: int,
    num_clients: int | None = None,
    on_demand: bool = False,
) -> FederatedData:
    """Load, tokenise (once), partition and wrap a dataset for federated rounds.

    Args:
      spec: the data spec (the config's ``data:`` section).
      tokenizer: a Hugging Face tokenizer with pad id 0 and EOS id 1.
      seed: the run seed (partitioning, per-round shuffling, synthetic data).
      local_work: batch size and local steps or epochs per round (the ``federated`` section).
      eval_batch_size: the default batch size of :meth:`FederatedData.eval_batches` (``eval.batch_size``).
      num_clients: number of clients; for natural partitions ``None`` means all of them.
      on_demand: tokenise a training example when its client is first fed, and the eval
        split when it is first batched (:class:`~fedjax_fm.data.tokenize.OnDemandTokens`),
        instead of both splits up front; what each process of a multi-process run does.
        Settings that need every example's length before the first round (the
        ``length_bucket`` partition, packing with ``local_epochs``) and a ``cache_dir``
        (whose file holds the whole split) tokenise the training split up front anyway;
        :func:`on_demand_blocker` names the reason.
    """
    part = spec.partition
    needed = [c for c in (part.group_field if part.method == "dirichlet_group" else None,
                          part.natural_field if part.method == "natural" else None) if c]
    train, evaluation = load_source(spec.source, seed=seed, partition_columns=needed)
    token_kwargs = dict(prompt_template=spec.prompt_template, max_input_length=spec.max_input_length,
                        max_target_length=spec.max_target_length)
    train_fill = eval_fill = None
    if on_demand and on_demand_blocker(spec, local_work) is None:
        train_fill = OnDemandTokens(train, tokenizer, **token_kwargs)
        train_tokens, train_report = train_fill.tokens, train_fill.report()
    else:
        train_tokens, train_report = cached_tokenize(train, tokenizer, spec.cache_dir, **token_kwargs)
    if on_demand and spec.cache_dir is None:
        eval_fill = OnDemandTokens(evaluation, tokenizer, **token_kwargs)
        eval_tokens, eval_report = eval_fill.tokens, eval_fill.report()
    else:
        eval_tokens, eval_report = cached_tokenize(evaluation, tokenizer, spec.cache_dir, **token_kwargs)
    partition = partition_examples(train, train_tokens, part, seed=seed, num_clients=num_clients)
    largest = max(len(i) for i in partition.client_indices)
    packing = spec.packing_spec()
    steps = local_work.steps_per_round(largest)
    if packing is not None and local_work.epochs is not None:
        steps = packed_epoch_steps(train_tokens, partition.client_indices, local_work, packing, seed=seed)
    return FederatedData(
        client_ids=list(partition.client_ids),
        partition=partition,
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        eval_examples=evaluation,
        local_work=local_work,
        steps_per_round=steps,
        seed=seed,
        eval_batch_size=eval_batch_size,
        truncation_reports={"train": train_report, "eval": eval_report},
        packing=packing,
        train_fill=train_fill,
        eval_fill=eval_fill,
    )


def on_demand_blocker(spec: DataSpec, local_work: batching.LocalWork) -> str | None:
    """Why the training split must be tokenised up front even when asked on demand (None: it need not)."""
    if spec.partition.method == "dirichlet_group" and spec.partition.group_field == "length_bucket":
        return "data.partition.group_field 'length_bucket' groups clients by every example's length"
    if spec.packing.enabled and local_work.epochs is not None:
        return "packing with federated.local_epochs sizes the rounds from every client's packing"
    if spec.cache_dir is not None:
        return "data.cache_dir stores (and loads) the whole tokenised split"
    return None


def packed_epoch_steps(tokens: TokenizedExamples, client_indices: Sequence[np.ndarray], local_work: batching.LocalWork,
                       spec: PackingSpec, *, seed: int, margin: float = 1.25) -> int:
    """Static steps per round for ``local_epochs`` with packing.

    The rows a client's ``round(E n_c)`` examples need vary a little with each round's
    shuffle, so the run sizes its rounds from the round-0 packing of every client, times
    ``margin`` (+1 row), never above the unpacked count (one example per row always fits).
    A later round that still overflows is a ``DataError`` naming the rows it needed.
    """
    from fedjax_fm.data.packing import _PACK_STREAM, rows_needed

    rows = 0
    for k, indices in enumerate(client_indices):
        m = max(1, round(local_work.epochs * len(indices)))
        stream, _ = batching.round_slots(indices, seed=seed, round_index=0, client=k, num_slots=m, num_real=m)
        rows = max(rows, rows_needed(tokens, stream, spec, np.random.default_rng([seed, 0, k, _PACK_STREAM])))
    unpacked = local_work.steps_per_round(max(len(i) for i in client_indices))
    return max(1, min(unpacked, -(-int(np.ceil(rows * margin) + 1) // local_work.batch_size)))



def prefetch_round_batches(
    data: FederatedData,
    rounds: Iterable[int],
    clients_for_round: Callable[[int], Sequence[int | str]],
    *,
    depth: int = 1,
) -> Iterator[tuple[int, list[int | str], dict[str, np.ndarray]]]:
    """Yield ``(round, clients, batches)`` while the next ``depth`` rounds are gathered in a thread.

    ``clients_for_round(r)`` is the runner's (pure, seeded) client sampler. NumPy's gathers
    release the GIL, so producing round ``r + 1`` overlaps the compute of round ``r`` and the
    data time a round waits for drops to about zero. The batches are exactly those of
    ``data.clients_round_batches(clients_for_round(r), r)``.
    """
    import collections
    from concurrent.futures import ThreadPoolExecutor

    if depth < 1:
        raise DataError(f"prefetch depth must be >= 1, got {depth}")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedjax-fm-data") as pool:
        pending: collections.deque = collections.deque()
        iterator = iter(rounds)

        def submit() -> bool:
            for r in iterator:
                clients = list(clients_for_round(r))
                pending.append((r, clients, pool.submit(data.clients_round_batches, clients, r)))
                return True
            return False

        for _ in range(depth + 1):
            if not submit():
                break
        while pending:
            r, clients, future = pending.popleft()
            batches = future.result()
            submit()
            yield r, clients, batches
