"""An append-only, hash-chained record of what each round trained on and produced.

``lineage.jsonl`` has one line per round; each line is the *canonical JSON* of one
entry (keys sorted, no spaces, ASCII, ``allow_nan=False``), so the file's bytes are
a function of the entries alone. An entry holds::

    round                  1-based round number (the state after it has round == this)
    clients                [{"id", "num_examples", "data_sha256"}] of the participating clients
    config_sha256          SHA-256 of the run config's canonical JSON (config_sha256())
    package                {"version", "git_commit", "git_dirty"} of fedjax_fm
    environment_sha256     SHA-256 of the environment dict (training/environment.py)
    environment            the full dict: in the first entry, and again whenever it changed
                           (e.g. a resume on another machine); absent otherwise
    params_sha256          fingerprint of the parameters after the round (fingerprint.py)
    extra                  optional JSON object (privacy ε so far, ...); absent when not given
    prev_hash              entry_hash of the previous entry; 64 zeros for the first
    entry_hash             SHA-256 of the canonical JSON of this entry without entry_hash

Changing any byte of an entry changes its ``entry_hash`` (detected by recomputing it),
and rewriting the hash too breaks the next entry's ``prev_hash``: the chain is
tamper-evident from the first changed entry on (not tamper-proof — whoever can
rewrite the whole tail can forge it; anchor the last ``entry_hash`` elsewhere, e.g.
in summary.json, for that). No timestamps or host names, so a killed and resumed run
(``truncate_lineage`` to the checkpoint's round, then append) writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedjax_fm.training.fingerprint import params_sha256

LINEAGE_FILE = "lineage.jsonl"
GENESIS_HASH = "0" * 64


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN/Inf: one text per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_json(obj: Any) -> str:
    """SHA-256 (hex) of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


def config_sha256(config: Any) -> str:
    """SHA-256 of a config given as a JSON-ready mapping or a (nested) dataclass."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return sha256_json(config)


def data_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a client's tokenised training data, e.g. ``{"input_ids": ..., "labels": ...}``.

    Canonical order and encoding are :func:`fedjax_fm.training.fingerprint.params_sha256`'s:
    arrays by ascending name, each as ``name\\ndtype\\nshape\\n`` then its C-order bytes.
    So the fingerprint depends on names, dtypes, shapes and values, not on dict order.
    """
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("data_fingerprint needs a non-empty mapping of name -> array")
    for name, value in arrays.items():
        if not isinstance(name, str) or not hasattr(value, "dtype"):
            raise TypeError(f"data_fingerprint: {name!r} must be a str naming an array, got {type(value).__name__}")
    return params_sha256({name: np.asarray(value) for name, value in arrays.items()})


def _entry_hash(entry: Mapping[str, Any]) -> str:
    return sha256_json({k: v for k, v in entry.items() if k != "entry_hash"})


def make_entry(
    *,
    round_index: int,
    client_ids: Sequence[int],
    num_examples: Sequence[float],
    data_sha256: Sequence[str],
    config_sha256: str,
    params_sha256: str,
    environment: Mapping[str, Any],
    prev_entry: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One chained entry (see the module docstring) following ``prev_entry`` (None: the first)."""
    if not len(client_ids) == len(num_examples) == len(data_sha256):
        raise ValueError(
            f"client_ids ({len(client_ids)}), num_examples ({len(num_examples)}) and data_sha256 "
            f"({len(data_sha256)}) must have one value per participating client"
        )
    if prev_entry is not None and round_index <= int(prev_entry["round"]):
        raise ValueError(f"round {round_index} does not follow the last recorded round {prev_entry['round']}")
    env_hash = sha256_json(dict(environment))
    source = environment.get("fedjax_fm", {}) if isinstance(environment, Mapping) else {}
    entry: dict[str, Any] = {
        "round": int(round_index),
        "clients": [
            {"id": int(c), "num_examples": _number(n), "data_sha256": str(h)}
            for c, n, h in zip(client_ids, num_examples, data_sha256)
        ],
        "config_sha256": str(config_sha256),
        "package": {k: source.get(k) for k in ("version", "git_commit", "git_dirty")},
        "environment_sha256": env_hash,
        "params_sha256": str(params_sha256),
        "prev_hash": GENESIS_HASH if prev_entry is None else str(prev_entry["entry_hash"]),
    }
    if prev_entry is None or prev_entry.get("environment_sha256") != env_hash:
        entry["environment"] = dict(environment)
    if extra is not None:
        entry["extra"] = dict(extra)
    entry["entry_hash"] = _entry_hash(entry)
    return entry


def _number(value: Any) -> int | float:
    """Example counts as JSON numbers: whole floats become ints so 3.0 and 3 hash alike."""
    value = float(value)
    return int(value) if value.is_integer() else value


def lineage_path(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file path, else ``path/lineage.jsonl`` (a run directory)."""
    path = Path(path)
    return path / LINEAGE_FILE if path.is_dir() else path


def read_lineage(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All entries, in file order (raises on a line that is not JSON; use verify_lineage to check)."""
    path = lineage_path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


class LineageWriter:
    """Appends chained entries to ``lineage.jsonl``; reads the last entry once when opened.

    Every append is one ``write`` of one line followed by flush + fsync, so a crash
    leaves at most a partial last line (which ``verify_lineage`` reports and
    ``truncate_lineage`` removes on resume).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = lineage_path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_lineage(self.path)
        self.last: dict[str, Any] | None = entries[-1] if entries else None

    def append(
        self,
        *,
        round_index: int,
        client_ids: Sequence[int],
        num_examples: Sequence[float],
        data_sha256: Sequence[str],
        config_sha256: str,
        params_sha256: str,
        environment: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Build the next entry, append it, and return it."""
        entry = make_entry(
            round_index=round_index,
            client_ids=client_ids,
            num_examples=num_examples,
            data_sha256=data_sha256,
            config_sha256=config_sha256,
            params_sha256=params_sha256,
            environment=environment,
            prev_entry=self.last,
            extra=extra,
        )
        line = canonical_json(entry) + "\n"
        with open(self.path, "a", encoding="ascii") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.last = entry
        return entry


@dataclasses.dataclass(frozen=True)
class LineageCheck:
    """Result of :func:`verify_lineage`. ``ok`` iff nothing is broken.

    ``first_bad_line``: 1-based line of the first broken entry (None when ok, or when
    only the final fingerprint differs); ``first_bad_round``: its round when readable.
    """

    ok: bool
    num_entries: int
    last_round: int | None
    last_entry_hash: str | None
    first_bad_line: int | None = None
    first_bad_round: int | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def verify_lineage(path: str | os.PathLike, final_params_sha256: str | None = None) -> LineageCheck:
    """Check the hash chain of a ``lineage.jsonl`` (or of ``run_dir/lineage.jsonl``).

    For every line: it is canonical JSON of an object, its ``entry_hash`` is the hash
    of the rest, its ``prev_hash`` is the previous entry's ``entry_hash`` (64 zeros
    for the first), and rounds increase. With ``final_params_sha256``, the last
    entry's ``params_sha256`` must equal it (the record ends at the published model).
    Reports the first broken entry and why.
    """
    path = lineage_path(path)
    if not path.exists():
        return LineageCheck(False, 0, None, None, reason=f"{path} does not exist")
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last entry
    prev: dict[str, Any] | None = None
    for number, raw in enumerate(lines, start=1):
        bad = _check_line(raw, prev)
        if bad is not None:
            round_number = _round_of(raw)
            where = f"line {number}" + (f" (round {round_number})" if round_number is not None else "")
            return LineageCheck(
                False,
                len(lines),
                None if prev is None else prev["round"],
                None if prev is None else prev["entry_hash"],
                first_bad_line=number,
                first_bad_round=round_number,
                reason=f"{where}: {bad}",
            )
        prev = json.loads(raw)
    if prev is None:
        return LineageCheck(False, 0, None, None, reason=f"{path} has no entries")
    if final_params_sha256 is not None and prev["params_sha256"] != final_params_sha256:
        return LineageCheck(
            False,
            len(lines),
            prev["round"],
            prev["entry_hash"],
            reason=(
                f"the last entry (round {prev['round']}) records params_sha256 {prev['params_sha256']}, "
                f"but the final parameters have {final_params_sha256}"
            ),
        )
    return LineageCheck(True, len(lines), prev["round"], prev["entry_hash"])


def _check_line(raw: bytes, prev: Mapping[str, Any] | None) -> str | None:
    """Why this line breaks the chain, or None."""
    try:
        entry = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        return f"not a JSON line ({err})"
    if not isinstance(entry, dict):
        return "not a JSON object"
    missing = [k for k in ("round", "params_sha256", "prev_hash", "entry_hash") if k not in entry]
    if missing:
        return f"missing fields {missing}"
    if raw.decode("ascii") != canonical_json(entry):
        return "not in canonical JSON form (the bytes were edited)"
    if _entry_hash(entry) != entry["entry_hash"]:
        return "entry_hash does not match the entry's content (the entry was edited)"
    expected_prev = GENESIS_HASH if prev is None else prev["entry_hash"]
    if entry["prev_hash"] != expected_prev:
        return "prev_hash does not match the previous entry's entry_hash (an entry was changed, removed or inserted)"
    if prev is not None and not (isinstance(entry["round"], int) and entry["round"] > prev["round"]):
        return f"round {entry['round']} does not follow round {prev['round']}"
    return None


def _round_of(raw: bytes) -> int | None:
    try:
        value = json.loads(raw.decode("ascii")).get("round")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def truncate_lineage(path: str | os.PathLike, round_index: int) -> int:
    """Keep the entries with ``round <= round_index`` (for a resume from that checkpoint).

    The kept lines are copied byte for byte and the file is replaced atomically, so
    re-appending the same rounds reproduces the original file exactly. A partial or
    unreadable line (a crash mid-write) ends the kept prefix. Returns the number kept.
    """
    path = lineage_path(path)
    if not path.exists():
        return 0
    kept: list[bytes] = []
    for raw in path.read_bytes().split(b"\n"):
        round_number = _round_of(raw) if raw else None
        if round_number is None or round_number > round_index:
            break
        kept.append(raw + b"\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept)


def client_records(
    client_ids: Iterable[int], num_examples: Iterable[float], data: Mapping[int, Mapping[str, np.ndarray]]
) -> tuple[list[int], list[float], list[str]]:
    """``(ids, counts, data_sha256)`` for the participating clients, from their tokenised data."""
    ids = [int(c) for c in client_ids]
    counts = [float(n) for n in num_examples]
    return ids, counts, [data_fingerprint(data[c]) for c in ids]


# ------------------------------------------------------------------ a run's lineage

FINAL_PARAMS_FILE = "final_params.msgpack"


class RunLineage:
    """The run layer's use of the chain: an entry after every training round, truncation on resume.

    ``client_data(c)`` gives a client's tokenised training arrays (fingerprinted once,
    then cached). At the end, :meth:`finish` writes the final variables as
    ``DIR/final_params.msgpack`` (Flax msgpack: the exact tree ``params_sha256``
    covers), so that ``fedjax-fm lineage verify DIR`` can recompute their fingerprint.
    """

    def __init__(self, out_dir: str | os.PathLike, config: Any, environment: Mapping[str, Any],
                 client_data: Any):
        self.out_dir = Path(out_dir)
        self.config_sha256 = config_sha256(config)
        self.environment = dict(environment)
        self._client_data = client_data
        self._fingerprints: dict[int, str] = {}
        self.writer: LineageWriter | None = None

    def open(self, rounds_done: int) -> None:
        """Keeps the entries up to ``rounds_done`` (the checkpoint's round; 0 for a fresh run) and opens for appending."""
        truncate_lineage(self.out_dir / LINEAGE_FILE, rounds_done)
        self.writer = LineageWriter(self.out_dir / LINEAGE_FILE)

    def fingerprint(self, client: int) -> str:
        if client not in self._fingerprints:
            self._fingerprints[client] = data_fingerprint(self._client_data(client))
        return self._fingerprints[client]

    def remember(self, client: int, fingerprint: str) -> None:
        """Takes a client's fingerprint computed elsewhere (by the process that fed it, in a multi-process run)."""
        known = self._fingerprints.setdefault(int(client), fingerprint)
        if known != fingerprint:
            raise ValueError(f"client {client}: two processes fingerprint its data differently ({known} and {fingerprint})")

    def append(self, round_index: int, client_ids: Sequence[int], num_examples: Sequence[float],
               variables: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        assert self.writer is not None, "RunLineage.open first"
        ids = [int(c) for c in client_ids]
        return self.writer.append(
            round_index=round_index, client_ids=ids, num_examples=list(num_examples),
            data_sha256=[self.fingerprint(c) for c in ids], config_sha256=self.config_sha256,
            params_sha256=params_sha256(variables), environment=self.environment, extra=extra,
        )

    def finish(self, variables: Any) -> dict[str, Any]:
        """Writes ``final_params.msgpack``; returns summary.json's ``lineage`` entry."""
        import flax.serialization
        import jax

        path = self.out_dir / FINAL_PARAMS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(variables)))
        os.replace(tmp, path)
        last = self.writer.last if self.writer is not None else None
        return {
            "file": LINEAGE_FILE,
            "entries": None if last is None else int(last["round"]),
            "last_entry_hash": None if last is None else last["entry_hash"],
            "final_params_file": FINAL_PARAMS_FILE,
            "config_sha256": self.config_sha256,
        }


def verify_run(run_dir: str | os.PathLike) -> LineageCheck:
    """The chain, then that it ends at the run's final parameters: summary.json's ``params_sha256``
    and the fingerprint recomputed from ``final_params.msgpack``."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    published = json.loads(summary_path.read_text()).get("params_sha256") if summary_path.is_file() else None
    check = verify_lineage(run_dir, final_params_sha256=published)
    if not check.ok:
        return check
    params_path = run_dir / FINAL_PARAMS_FILE
    if not params_path.is_file():
        return dataclasses.replace(check, ok=False, reason=f"{params_path} is missing: the final parameters cannot be checked")
    import flax.serialization

    try:
        variables = flax.serialization.msgpack_restore(params_path.read_bytes())
        recomputed = params_sha256(variables)
    except Exception as error:  # a corrupted file: any decoding error means it is not the published model
        return dataclasses.replace(check, ok=False, reason=f"{params_path} cannot be read ({type(error).__name__}: {error})")
    last = read_lineage(run_dir)[-1]
    if recomputed != last["params_sha256"]:
        return dataclasses.replace(check, ok=False, reason=(
            f"{params_path.name} has params_sha256 {recomputed}, but the last lineage entry (round "
            f"{last['round']}) records {last['params_sha256']}: the final parameters were changed"))
    return check


def _lineage_command(args: Any) -> int:
    import sys

    check = verify_run(args.dir)
    if check.ok:
        print(f"lineage ok: {check.num_entries} entries, last round {check.last_round}, "
              f"last entry_hash {check.last_entry_hash}; final parameters match")
        return 0
    print(f"lineage FAILED: {check.reason}", file=sys.stderr)
    return 1


def add_lineage_command(subparsers: Any) -> None:
    """Registers ``fedjax-fm lineage verify DIR``."""
    parser = subparsers.add_parser("lineage", help="check a run's lineage record",
                                   description="Check a run's hash-chained lineage.jsonl and its final parameters.")
    sub = parser.add_subparsers(dest="lineage_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="verify DIR/lineage.jsonl, summary.json and final_params.msgpack",
                            description="Exit 0 when the chain is intact and ends at the run's final parameters, else 1.")
    verify.add_argument("dir", metavar="DIR", help="run directory")
    verify.set_defaults(func=_lineage_command)
