"""Text-to-text datasets from tensorflow-datasets (TFDS).

Any builder works given the names of its input and target features; the common
summarisation builders have their mapping built in (:data:`TFDS_FIELDS`). Reading goes
through ``tfds.data_source`` (random access to ArrayRecord files, no TensorFlow) when the
prepared dataset is in ``array_record`` format, and through ``tfds.as_numpy`` (which
needs TensorFlow) otherwise.

SAMSum is a manual-download builder: put SAMSum's ``train.json``, ``val.json`` and
``test.json`` in a directory and pass it as ``manual_dir``; it is prepared on first use
(preparing SAMSum needs TensorFlow, the ``tensorflow`` extra). Nothing is downloaded
unless the builder itself downloads (CNN/DailyMail, XSum, BillSum do, when not prepared).
"""

from __future__ import annotations

import pathlib

from fedjax_fm.data.records import DataError, TextExamples, require_nonempty

# builder name -> (input feature, target feature, id feature or None)
TFDS_FIELDS: dict[str, tuple[str, str, str | None]] = {
    "samsum": ("dialogue", "summary", "id"),
    "cnn_dailymail": ("article", "highlights", "id"),
    "xsum": ("document", "summary", None),
    "billsum": ("text", "summary", None),
}


def _text(value, feature: str, where: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: feature {feature!r} is not valid UTF-8 ({err.reason})") from None
    if isinstance(value, str):
        return value
    raise DataError(f"{where}: feature {feature!r} is not text (got {type(value).__name__})")


def _builder(name: str, data_dir: str | None, file_format: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir, file_format=file_format)
    except Exception as err:  # tfds raises several types for unknown names / bad dirs
        raise DataError(f"tfds:{name}: cannot build the dataset builder: {err}") from err


# Files a manual-download builder needs in its manual_dir (SAMSum's JSON release).
MANUAL_FILES: dict[str, tuple[str, ...]] = {"samsum": ("train.json", "val.json", "test.json")}


def _check_manual_dir(base: str, manual_dir: str | None, builder) -> None:
    """Refuses, with the two ways out, a manual builder given no folder of files at all
    (before TFDS creates any folder of its own). A folder that holds files is left to
    TFDS, whose error then names what is missing."""
    if manual_dir is not None:  # a directory (checked before)
        if any(pathlib.Path(manual_dir).iterdir()):
            return
        problem = f"data.source.manual_dir={manual_dir!r} is empty"
    else:
        problem = "data.source.manual_dir is not set"
    needed = MANUAL_FILES.get(base)
    files = ", ".join(needed) if needed else "the builder's files"
    if base == "samsum":
        message = (f"tfds:{base} is not prepared in {builder.data_dir} and TFDS cannot download it ({problem}). "
                   f"Put {files} in a folder, then either read them directly (no TensorFlow needed):\n"
                   f"  --set data.source.kind=samsum_json --set data.source.path=/path/to/folder\n"
                   f"or let TFDS prepare them once (needs the tensorflow extra):\n"
                   f"  --set data.source.manual_dir=/path/to/folder")
    else:
        message = (f"tfds:{base} is not prepared in {builder.data_dir} and needs manually downloaded files "
                   f"({problem}): set data.source.manual_dir to a folder holding them")
    raise DataError(message)


def prepare_tfds(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                 file_format: str = "array_record"):
    """Prepare (generate) a TFDS dataset if needed; returns the builder."""
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir, file_format)
    if builder.is_prepared():
        return builder
    if manual_dir is not None and not pathlib.Path(manual_dir).is_dir():
        raise DataError(f"tfds:{name}: manual_dir {manual_dir} is not a directory")
    instructions = (getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or "").strip()
    if instructions:
        # A manual-download builder: say what to do before TFDS creates any folder.
        _check_manual_dir(name.split(":")[0].split("/")[0], manual_dir, builder)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config)
    except ModuleNotFoundError as err:
        raise DataError(
            f"tfds:{name}: preparing this builder needs {err.name!r}; install the extra: pip install 'fedjax-fm[tensorflow]'"
        ) from err
    except Exception as err:  # tfds raises AssertionError, FileNotFoundError, ... for missing inputs
        hint = f" This builder needs manually downloaded files in manual_dir: {instructions}" if instructions else ""
        raise DataError(f"tfds:{name}: preparing the dataset failed ({type(err).__name__}: {err}).{hint}") from err
    return builder


def load_tfds(
    name: str,
    split: str,
    *,
    input_field: str | None = None,
    target_field: str | None = None,
    id_field: str | None = None,
    extra_fields: tuple[str, ...] = (),
    data_dir: str | None = None,
    manual_dir: str | None = None,
    prepare: bool = True,
    max_examples: int | None = None,
    file_format: str = "array_record",
) -> TextExamples:
    """A split of a TFDS text-to-text dataset as :class:`TextExamples`.

    Args:
      name: builder name, optionally with config/version (``"cnn_dailymail:3.4.0"``).
      split: split name or TFDS slice (``"train"``, ``"validation[:100]"``).
      input_field, target_field, id_field: feature names; default from :data:`TFDS_FIELDS`.
      extra_fields: further text features kept as columns (e.g. a topic for partitioning).
      data_dir: where TFDS keeps prepared datasets (TFDS's default when None).
      manual_dir: the manual-download directory (SAMSum's JSON files).
      prepare: prepare the dataset when it is not prepared yet.
      max_examples: keep only the first ``max_examples``.
      file_format: storage format when preparing; ``array_record`` allows ``tfds.data_source``.
    """
    import tensorflow_datasets as tfds

    base = name.split(":")[0].split("/")[0]
    default = TFDS_FIELDS.get(base)
    if (input_field is None or target_field is None) and default is None:
        raise DataError(
            f"tfds:{name}: no built-in field mapping; give input_field and target_field "
            f"(built in: {sorted(TFDS_FIELDS)})"
        )
    input_field = input_field or default[0]
    target_field = target_field or default[1]
    if id_field is None and default is not None and input_field == default[0]:
        id_field = default[2]
    origin = f"tfds:{name}/{split}"

    builder = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir, file_format=file_format) if prepare \
        else _builder(name, data_dir, file_format)
    if not builder.is_prepared():
        raise DataError(f"{origin}: not prepared in {builder.data_dir}; call with prepare=True")
    available = sorted(builder.info.features.keys())
    missing = [f for f in (input_field, target_field, id_field, *extra_fields) if f is not None and f not in available]
    if missing:
        raise DataError(f"{origin}: missing feature(s) {missing}; available features: {available}")

    stored_format = getattr(builder.info, "file_format", None)
    if str(getattr(stored_format, "value", stored_format)) == "array_record":
        source = builder.as_data_source(split=split)
        count = len(source) if max_examples is None else min(len(source), max_examples)
        records = (source[i] for i in range(count))
    else:  # tfrecord: needs TensorFlow
        try:
            dataset = builder.as_dataset(split=split)
        except ModuleNotFoundError as err:
            raise DataError(f"{origin}: reading tfrecord datasets needs TensorFlow: pip install 'fedjax-fm[tensorflow]'") from err
        records = tfds.as_numpy(dataset.take(max_examples) if max_examples is not None else dataset)

    inputs, targets, ids = [], [], []
    columns: dict[str, list[str]] = {f: [] for f in extra_fields}
    for i, record in enumerate(records):
        where = f"{origin}: example {i}"
        inputs.append(_text(record[input_field], input_field, where))
        targets.append(_text(record[target_field], target_field, where))
        ids.append(_text(record[id_field], id_field, where) if id_field else f"{base}-{split}-{i}")
        for f in extra_fields:
            columns[f].append(_text(record[f], f, where))
    return require_nonempty(TextExamples(inputs, targets, ids, columns, origin=origin))
