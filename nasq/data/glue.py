"""GLUE task registry and split loading.

Every split is returned as a `datasets.Dataset` with the columns ``text_a`` (str), ``text_b`` (str, pair tasks
only) and ``label`` (int class id, or float for the STS-B regression task).

Two sources:

* ``data_dir`` given: ``data_dir/<dir_name>/<file>.tsv`` in the standard GLUE distribution layout, read with
  the stdlib ``csv`` module (tab separated, ``quoting=csv.QUOTE_NONE``, ``encoding="utf-8-sig"`` so MRPC's
  byte-order mark vanishes). CoLA has no header row; every other task has one.
* ``data_dir=None``: the Hugging Face hub dataset ``nyu-mll/glue`` (needs network or a warm cache).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import datasets

from nasq.errors import NasqError

HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "dev")


@dataclass(frozen=True)
class TaskSpec:
    """How to find, read and score one GLUE task.

    Column fields (``tsv_*``) are header names, or 0-based column indices when ``tsv_header`` is False
    (CoLA). ``label_names`` maps string labels to class ids (id = position); None means the TSV label is
    already numeric (int, or float for regression).
    """

    name: str
    dir_name: str
    num_labels: int
    is_regression: bool
    metric_names: tuple[str, ...]
    main_metric: str
    hub_config: str
    hub_text_a: str
    hub_text_b: str | None
    hub_dev_split: str
    dev_file: str
    tsv_header: bool
    tsv_text_a: str | int
    tsv_text_b: str | int | None
    tsv_label: str | int
    tsv_num_fields: int | None = None  # only for headerless files; else the header's length
    label_names: tuple[str, ...] | None = None

    @property
    def is_pair(self) -> bool:
        return self.tsv_text_b is not None

    def split_file(self, split: str) -> str:
        """TSV file name of ``split`` ("train" | "dev")."""
        _check_split(split)
        return "train.tsv" if split == "train" else self.dev_file


_CLS = ("accuracy",)
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", "CoLA", 2, False, ("matthews", "accuracy"), "matthews", "cola", "sentence", None,
                 "validation", "dev.tsv", False, 3, None, 1, tsv_num_fields=4),
        TaskSpec("sst2", "SST-2", 2, False, _CLS, "accuracy", "sst2", "sentence", None,
                 "validation", "dev.tsv", True, "sentence", None, "label"),
        TaskSpec("mrpc", "MRPC", 2, False, ("f1", "accuracy"), "f1", "mrpc", "sentence1", "sentence2",
                 "validation", "dev.tsv", True, "#1 String", "#2 String", "Quality"),
        TaskSpec("qqp", "QQP", 2, False, ("f1", "accuracy"), "f1", "qqp", "question1", "question2",
                 "validation", "dev.tsv", True, "question1", "question2", "is_duplicate"),
        TaskSpec("stsb", "STS-B", 1, True, ("pearson", "spearman", "pearson_spearman"), "pearson_spearman",
                 "stsb", "sentence1", "sentence2", "validation", "dev.tsv", True, "sentence1", "sentence2",
                 "score"),
        TaskSpec("mnli", "MNLI", 3, False, _CLS, "accuracy", "mnli", "premise", "hypothesis",
                 "validation_matched", "dev_matched.tsv", True, "sentence1", "sentence2", "gold_label",
                 label_names=_NLI3),
        TaskSpec("mnli_mm", "MNLI", 3, False, _CLS, "accuracy", "mnli", "premise", "hypothesis",
                 "validation_mismatched", "dev_mismatched.tsv", True, "sentence1", "sentence2", "gold_label",
                 label_names=_NLI3),
        TaskSpec("qnli", "QNLI", 2, False, _CLS, "accuracy", "qnli", "question", "sentence",
                 "validation", "dev.tsv", True, "question", "sentence", "label", label_names=_NLI2),
        TaskSpec("rte", "RTE", 2, False, _CLS, "accuracy", "rte", "sentence1", "sentence2",
                 "validation", "dev.tsv", True, "sentence1", "sentence2", "label", label_names=_NLI2),
        TaskSpec("wnli", "WNLI", 2, False, _CLS, "accuracy", "wnli", "sentence1", "sentence2",
                 "validation", "dev.tsv", True, "sentence1", "sentence2", "label"),
    )
}

_ALIASES = {"mnlim": "mnli", "mnlimatched": "mnli", "mnlimm": "mnli_mm", "mnlimismatched": "mnli_mm"}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by name, case- and punctuation-insensitively ("SST-2", "sst2", "STS-B", "mnli-mm")."""
    if isinstance(name, TaskSpec):
        return name
    key = _key(str(name))
    for spec in TASKS.values():
        if _key(spec.name) == key or (_key(spec.dir_name) == key and spec.name != "mnli_mm"):
            return spec
    if key in _ALIASES:
        return TASKS[_ALIASES[key]]
    raise NasqError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise NasqError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def load_split(task: TaskSpec | str, split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """Load ``split`` ("train" | "dev") of ``task`` as a Dataset with text_a[, text_b], label columns."""
    spec = get_task(task)
    _check_split(split)
    if data_dir is None:
        return _load_hub(spec, split)
    return datasets.Dataset.from_dict(read_tsv(spec, Path(data_dir) / spec.dir_name / spec.split_file(split)))


def read_tsv(spec: TaskSpec, path: Path) -> dict[str, list]:
    """Parse one GLUE TSV into ``{"text_a": [...], ["text_b": [...],] "label": [...]}`` (strict)."""
    if not path.is_file():
        raise NasqError(
            f"{path}: file not found; --data-dir must point at a GLUE directory with the standard layout "
            f"(<data-dir>/{spec.dir_name}/{path.name})"
        )
    a_out: list[str] = []
    b_out: list[str] = []
    y_out: list[int | float] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            if spec.tsv_header:
                header = next(reader, None)
                if header is None:
                    raise NasqError(f"{path}: empty file; expected a header row")
                wanted = [c for c in (spec.tsv_text_a, spec.tsv_text_b, spec.tsv_label) if c is not None]
                missing = [c for c in wanted if c not in header]
                if missing:
                    raise NasqError(
                        f"{path}:1: header lacks column(s) {missing}; expected {wanted} for task "
                        f"{spec.name}, found {header}"
                    )
                n_fields = len(header)
                ia, il = header.index(spec.tsv_text_a), header.index(spec.tsv_label)
                ib = header.index(spec.tsv_text_b) if spec.tsv_text_b is not None else None
            else:
                n_fields = spec.tsv_num_fields
                ia, ib, il = spec.tsv_text_a, spec.tsv_text_b, spec.tsv_label
            parse = _label_parser(spec)
            for row in reader:
                if not row:
                    continue
                if len(row) != n_fields:
                    raise NasqError(
                        f"{path}:{reader.line_num}: expected {n_fields} tab-separated fields for task "
                        f"{spec.name}, found {len(row)}"
                    )
                try:
                    y_out.append(parse(row[il]))
                except (ValueError, KeyError):
                    raise NasqError(
                        f"{path}:{reader.line_num}: cannot parse label {row[il]!r}; expected "
                        f"{_label_expectation(spec)}"
                    ) from None
                a_out.append(row[ia])
                if ib is not None:
                    b_out.append(row[ib])
    except UnicodeDecodeError as e:
        raise NasqError(f"{path}: not valid UTF-8 ({e}); expected a GLUE TSV file") from None
    except csv.Error as e:
        raise NasqError(f"{path}: malformed TSV ({e})") from None
    out: dict[str, list] = {"text_a": a_out}
    if spec.is_pair:
        out["text_b"] = b_out
    out["label"] = y_out
    return out


def _label_parser(spec: TaskSpec):
    if spec.is_regression:
        def parse_float(s: str) -> float:
            v = float(s)
            if not math.isfinite(v):  # nan / inf would poison every loss and metric
                raise ValueError(s)
            return v

        return parse_float
    if spec.label_names is not None:
        table = {n: i for i, n in enumerate(spec.label_names)}
        return lambda s: table[s.strip()]
    n = spec.num_labels

    def parse_int(s: str) -> int:
        v = int(s)
        if not 0 <= v < n:
            raise ValueError(s)
        return v

    return parse_int


def _label_expectation(spec: TaskSpec) -> str:
    if spec.is_regression:
        return "a finite number"
    if spec.label_names is not None:
        return f"one of {list(spec.label_names)}"
    return f"an integer in [0, {spec.num_labels})"


def _load_hub(spec: TaskSpec, split: str) -> datasets.Dataset:
    hub_split = "train" if split == "train" else spec.hub_dev_split
    try:
        ds = datasets.load_dataset(HUB_DATASET, spec.hub_config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure is a user-fixable setup problem
        raise NasqError(
            f"could not load {HUB_DATASET}/{spec.hub_config} split {hub_split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {e}); pass --data-dir pointing at a local GLUE directory with the "
            f"standard layout (<data-dir>/{spec.dir_name}/train.tsv, {spec.dev_file})"
        ) from None
    cols = {spec.hub_text_a: "text_a", "label": "label"}
    if spec.hub_text_b is not None:
        cols[spec.hub_text_b] = "text_b"
    ds = ds.select_columns(list(cols)).rename_columns(cols)
    order = ["text_a", "text_b", "label"] if spec.is_pair else ["text_a", "label"]
    return ds.select_columns(order)
