"""Local text-to-text files: SAMSum's JSON, generic JSON / JSONL / CSV, per-client folders.

Formats (``input_field`` / ``target_field`` name the columns; SAMSum's are
``dialogue`` / ``summary`` with ids in ``id``):

* JSON: one array of objects, e.g. SAMSum's ``[{"id": ..., "summary": ..., "dialogue": ...}]``.
* JSONL: one object per line (whitespace-only lines hold no record and are passed over).
* CSV: a header row naming the columns, then one example per row.
* Per-client folder: ``DIR/<client_id>.jsonl`` (or ``.json`` / ``.csv``), one file per
  client, as a device holding only its own data would have it; the file stem becomes
  the ``client`` column that the natural partitioner groups by.

Every problem is a :class:`DataError` naming the file: a missing path, bytes that are
not UTF-8 (with line and byte offset), malformed JSON (with its line number), a record
without a required field (listing the fields it has), a non-text value, an empty file.
Invalid records are skipped only when ``skip_invalid=True`` is asked for, and then a
warning says how many and why.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import warnings
from typing import Any, Iterable, Sequence

from fedjax_fm.data.records import DataError, TextExamples, concatenate, require_nonempty

_WARNED: set[tuple[str, int, str]] = set()  # skip_invalid warnings already given in this process

SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}


def read_text_utf8(path: str | pathlib.Path) -> str:
    """The file's text, decoded strictly as UTF-8 (a BOM is allowed)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}: not valid UTF-8 text (line {line}, byte offset {err.start}: {err.reason}); "
            "re-encode the file as UTF-8"
        ) from None


def _records_from_json(path: pathlib.Path, text: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        line = text.splitlines()[err.lineno - 1] if err.lineno <= len(text.splitlines()) else ""
        near = line[max(0, err.colno - 21): err.colno + 20]
        hint = (" (a file of one JSON object per line is JSON Lines: name it .jsonl)"
                if err.msg == "Extra data" else "")
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg.lower()} near {near!r}{hint}"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got a {type(data).__name__}")
    # JSON arrays have no line numbers per record; report the record's position (1-based).
    return [(i + 1, record) for i, record in enumerate(data)]


def _records_from_jsonl(path: pathlib.Path, text: str, skip_invalid: bool, problems: list[str]):
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            message = f"{path}: malformed JSON on line {lineno} (column {err.colno}): {err.msg}"
            if not skip_invalid:
                raise DataError(message) from None
            problems.append(message)
    return records


def _records_from_csv(path: pathlib.Path, text: str, skip_invalid: bool = False,
                      problems: list[str] | None = None) -> list[tuple[int, Any]]:
    """Rows as dicts keyed by the header, each with the line it starts on (a quoted cell
    may span lines). A row with more or fewer cells than the header is an error (or, with
    ``skip_invalid``, a skipped problem), never a dropped or empty cell."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    records = []
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not cells:
            continue
        if len(cells) != len(header):
            message = (f"{path}: line {line}: {len(cells)} cell(s) where the header has {len(header)} "
                       f"({', '.join(header)})")
            if not skip_invalid:
                raise DataError(message)
            if problems is not None:
                problems.append(message)
            continue
        records.append((line, dict(zip(header, cells))))
    return records


def _as_text(value: Any, field: str, where: str, allow_number: bool = False) -> str:
    if isinstance(value, str):
        return value
    # Ids and grouping keys are often numbers in user files; texts must really be texts.
    if allow_number and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__} ({value!r:.40})")


def read_examples(
    path: str | pathlib.Path,
    *,
    input_field: str = "dialogue",
    target_field: str = "summary",
    id_field: str | None = "id",
    extra_fields: Sequence[str] = (),
    file_format: str | None = None,
    skip_invalid: bool = False,
    allow_empty: bool = False,
) -> TextExamples:
    """Read one JSON / JSONL / CSV file of text-to-text examples.

    Args:
      path: the file; its suffix picks the format unless ``file_format`` is given.
      input_field, target_field: the record fields holding the model input and target text.
      id_field: the field holding an example id; ``None`` (or a record without it when the
        field is absent from every record) numbers examples as ``<file stem>-<n>``.
      extra_fields: further fields kept as string columns (e.g. a topic to partition by).
      file_format: ``"json"``, ``"jsonl"`` or ``"csv"``.
      skip_invalid: skip (with one warning) malformed lines and records lacking a field,
        instead of raising.
      allow_empty: return an empty result instead of raising for a file without examples.
    """
    path = pathlib.Path(path)
    fmt = file_format or SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt not in ("json", "jsonl", "csv"):
        raise DataError(f"{path}: unknown file format {fmt or path.suffix!r}; use one of json, jsonl, csv")
    text = read_text_utf8(path)
    problems: list[str] = []
    if fmt == "json":
        records = _records_from_json(path, text)
    elif fmt == "jsonl":
        records = _records_from_jsonl(path, text, skip_invalid, problems)
    else:
        records = _records_from_csv(path, text, skip_invalid, problems)
    unit = "record" if fmt == "json" else "line"

    # An id field that no record has is treated as absent (numbered ids), not as an error.
    use_ids = id_field is not None and any(isinstance(r, dict) and id_field in r for _, r in records)
    required = [input_field, target_field, *extra_fields] + ([id_field] if use_ids else [])
    inputs, targets, ids = [], [], []
    columns: dict[str, list[str]] = {name: [] for name in extra_fields}
    for position, record in records:
        where = f"{path}: {unit} {position}"
        if not isinstance(record, dict):
            message = f"{where}: expected a JSON object, got {type(record).__name__}"
            if not skip_invalid:
                raise DataError(message)
            problems.append(message)
            continue
        missing = [f for f in required if f not in record]
        if missing:
            message = f"{where}: missing field(s) {missing}; available fields: {sorted(record)}"
            keys = [key for key, name in (("input_field", input_field), ("target_field", target_field),
                                          ("id_field", id_field)) if name in missing]
            if keys:
                message += " (set " + " / ".join(f"data.source.{k}" for k in keys) + " to the field that holds it)"
            if not skip_invalid:
                raise DataError(message)
            problems.append(message)
            continue
        inputs.append(_as_text(record[input_field], input_field, where))
        targets.append(_as_text(record[target_field], target_field, where))
        ids.append(_as_text(record[id_field], id_field, where, True) if use_ids else f"{path.stem}-{len(ids)}")
        for name in extra_fields:
            columns[name].append(_as_text(record[name], name, where, True))
    if problems and (str(path.resolve()), len(problems), problems[0]) not in _WARNED:
        # Once per file: a run reads its training file twice (tokenizer texts, then examples).
        _WARNED.add((str(path.resolve()), len(problems), problems[0]))
        shown = "\n  ".join(problems[:5])
        warnings.warn(f"{path}: skipped {len(problems)} invalid record(s) as asked (skip_invalid=True):\n  {shown}")
    examples = TextExamples(inputs, targets, ids, columns, origin=str(path))
    return examples if allow_empty else require_nonempty(examples)


def read_client_folder(
    directory: str | pathlib.Path,
    *,
    client_column: str = "client",
    **read_kwargs,
) -> TextExamples:
    """Read ``DIR/<client_id>.{jsonl,json,csv}``: one file per client, in sorted client order.

    Ids are prefixed with the client id so they stay unique across files. The client id
    of every example is stored in the column ``client_column`` for the natural partitioner.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise DataError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise DataError(f"{directory}: expected a directory with one file per client")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS)
    if not files:
        raise DataError(f"{directory}: no client files (*.jsonl, *.json, *.csv) found")
    stems = [p.stem for p in files]
    duplicated = sorted({s for s in stems if stems.count(s) > 1})
    if duplicated:
        raise DataError(f"{directory}: clients with more than one file: {duplicated}")
    parts = []
    for path in files:
        part = read_examples(path, **read_kwargs)
        parts.append(
            TextExamples(
                part.inputs,
                part.targets,
                [f"{path.stem}/{i}" for i in part.ids],
                {**part.columns, client_column: [path.stem] * len(part)},
                origin=str(path),
            )
        )
    return concatenate(parts, origin=str(directory))


def write_jsonl(path: str | pathlib.Path, records: Iterable[dict]) -> None:
    """Write records one JSON object per line (UTF-8), e.g. to build a per-client folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
