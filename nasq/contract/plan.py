"""The discrete quantization plan: which bits each row group of each searched tensor gets (``plan.json``).

One format is written by ``nasq finalize`` (search), by every baseline (uniform, Hessian, random, ...) and read by
QAT fine-tuning, export and inspection. The schema is documented in ``docs/PLAN_FORMAT.md``; in short::

    {"format": "nasq-plan", "version": 1, "quant_mode": "symmetric" | "signed",
     "space": {"name", "source"}, "activations": {"bits", "granularity"},
     "fixed": {"word_embeddings_bits", "other_embeddings_bits", "unsearched_linear_bits"},
     "tensors": [{"path", "kind", "rows", "cols", "has_bias", "group_sizes", "choices", "bits",
                  "pruned_groups", "bytes", "rule"}, ...],
     "budget": {"bytes", "convention", "source", "fixed_bytes"} | null,
     "totals": {...}, "provenance": {...}}

Sizes come from :mod:`nasq.contract.cost` only (``group_nbytes`` per group, ``fixed_nbytes`` for the rest), so the
plan, the search's cost model and the exporter always agree.

Decisions:

* ``choices`` is the set the plan's bits are drawn from (the search space's choices for a searched plan, e.g.
  ``[3]`` for a uniform 3-bit baseline); every bit width must be one of them. Consumers use ``bits``, never
  ``choices``.
* Paths are relative to the BERT root (``encoder.layer.0.attention.self.query``); the head is ``classifier``.
* Fixed (unsearched) tensors at 8 bits are int8 with one step per row (vocabulary entry / output feature), in the
  plan's ``quant_mode``, exactly what :func:`nasq.contract.cost.fixed_nbytes` counts; biases and LayerNorms stay fp32.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from nasq._version import __version__
from nasq.contract.cost import (
    Budget,
    avg_bits,
    encoder_linear_nbytes,
    fixed_nbytes,
    fp32_nbytes,
    plan_size_bytes,
)
from nasq.contract.space import Fixed, SearchedTensor, SearchSpace, SpaceInfo
from nasq.errors import NasqError
from nasq.io import git_rev, read_json, write_atomic
from nasq.quant.packing import V1_REPACKED_WIDTHS

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "Plan",
    "PlanTensor",
    "make_plan",
]

PLAN_FORMAT = "nasq-plan"
PLAN_VERSION = 1
_MB = 10**6


# ------------------------------------------------------------------------------------------------ dataclasses


@dataclass(frozen=True)
class PlanTensor:
    """One searched tensor of a plan: its row-group layout and the bits of each group.

    ``rows`` = output features (vocabulary entries for embeddings); ``bytes`` = sum of
    ``group_nbytes(group_sizes[g], cols, bits[g], has_bias)``; ``pruned_groups`` = groups with 0 bits.
    """

    path: str
    kind: Literal["linear", "embedding"]
    rows: int
    cols: int
    has_bias: bool
    group_sizes: tuple[int, ...]
    choices: tuple[int, ...]
    bits: tuple[int, ...]
    pruned_groups: tuple[int, ...]
    bytes: int
    rule: str = ""

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    def searched(self) -> SearchedTensor:
        """The :class:`SearchedTensor` this entry describes (``rule`` may be empty)."""
        return SearchedTensor(path=self.path, rule=self.rule, rows=self.rows, cols=self.cols,
                              group_sizes=self.group_sizes, choices=self.choices, has_bias=self.has_bias,
                              kind=self.kind)

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "rule": self.rule, "rows": self.rows, "cols": self.cols,
                "has_bias": self.has_bias, "group_sizes": list(self.group_sizes), "choices": list(self.choices),
                "bits": list(self.bits), "pruned_groups": list(self.pruned_groups), "bytes": self.bytes}


_TENSOR_KEYS = ("path", "kind", "rows", "cols", "has_bias", "group_sizes", "choices", "bits", "pruned_groups",
                "bytes")
_TOP_KEYS = ("format", "version", "quant_mode", "space", "activations", "fixed", "tensors", "budget", "totals",
             "provenance")


@dataclass(frozen=True)
class Plan:
    """A validated plan (see the module docstring and ``docs/PLAN_FORMAT.md``)."""

    quant_mode: Literal["symmetric", "signed"]
    space: dict
    activations: dict
    fixed: Fixed
    tensors: tuple[PlanTensor, ...]
    budget: dict | None
    totals: dict
    provenance: dict
    version: int = PLAN_VERSION
    source: str = field(default="<inline>", compare=False)

    # ---------------------------------------------------------------- views
    def searched_tensors(self) -> list[SearchedTensor]:
        return [t.searched() for t in self.tensors]

    def bits_per_group(self) -> list[tuple[int, ...]]:
        return [t.bits for t in self.tensors]

    def tensor(self, path: str) -> PlanTensor:
        for t in self.tensors:
            if t.path == path:
                return t
        raise KeyError(path)

    @property
    def paths(self) -> list[str]:
        return [t.path for t in self.tensors]

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "quant_mode": self.quant_mode,
            "space": dict(self.space),
            "activations": dict(self.activations),
            "fixed": self.fixed.model_dump(),
            "tensors": [t.to_dict() for t in self.tensors],
            "budget": None if self.budget is None else dict(self.budget),
            "totals": dict(self.totals),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<inline>") -> Plan:
        """Validate a loaded ``plan.json`` mapping; errors name ``source``, the tensor index and the key."""
        where = f"plan {source}"
        if not isinstance(data, dict):
            raise NasqError(f"{where}: the top level must be a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise NasqError(f"{where}: 'format' is {data.get('format')!r}, expected {PLAN_FORMAT!r}; "
                            "this is not a nasq plan (write one with `nasq finalize` or a baseline)")
        version = data.get("version")
        if type(version) is not int or version != PLAN_VERSION:  # not True / 1.0
            raise NasqError(f"{where}: unsupported plan format version {version}, this nasq reads {PLAN_VERSION}; "
                            "re-create the plan with this nasq version")
        missing = [k for k in _TOP_KEYS if k not in data]
        if missing:
            raise NasqError(f"{where}: missing key(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise NasqError(f"{where}: unknown key(s) {', '.join(unknown)} (see docs/PLAN_FORMAT.md)")
        if data["quant_mode"] not in ("symmetric", "signed"):
            raise NasqError(f"{where}: quant_mode must be 'symmetric' or 'signed', got {data['quant_mode']!r}")
        for k in ("space", "activations", "fixed", "totals", "provenance"):
            if not isinstance(data[k], dict):
                raise NasqError(f"{where}: {k!r} must be an object, got {type(data[k]).__name__}")
        try:
            fixed = Fixed.model_validate(data["fixed"])
        except ValidationError as e:
            raise NasqError(f"{where}: invalid 'fixed': {e}") from None
        if not isinstance(data["tensors"], list) or not data["tensors"]:
            raise NasqError(f"{where}: 'tensors' must be a non-empty list")
        tensors = tuple(_tensor_from_dict(d, f"{where}: tensors[{i}]") for i, d in enumerate(data["tensors"]))
        seen: set[str] = set()
        for i, t in enumerate(tensors):
            if t.path in seen:
                raise NasqError(f"{where}: tensors[{i}].path {t.path!r} appears twice")
            seen.add(t.path)
        budget = data["budget"]
        if budget is not None:
            if not isinstance(budget, dict) or not isinstance(budget.get("bytes"), int) or budget["bytes"] < 0:
                raise NasqError(f"{where}: 'budget' must be null or an object with a non-negative integer "
                                f"'bytes', got {budget!r}")
            if budget.get("convention") not in ("encoder", "artifact"):
                raise NasqError(f"{where}: budget.convention must be 'encoder' or 'artifact', "
                                f"got {budget.get('convention')!r}")
        totals = data["totals"]
        searched = sum(t.bytes for t in tensors)
        if totals.get("searched_bytes") != searched:
            raise NasqError(f"{where}: totals.searched_bytes is {totals.get('searched_bytes')!r} but the tensors "
                            f"sum to {searched} bytes; the file was edited by hand or is corrupt")
        return cls(quant_mode=data["quant_mode"], space=dict(data["space"]), activations=dict(data["activations"]),
                   fixed=fixed, tensors=tensors, budget=None if budget is None else dict(budget),
                   totals=dict(totals), provenance=dict(data["provenance"]), version=version, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate ``plan.json`` (``NasqError`` naming the file on any problem)."""
        path = Path(path)
        if not path.exists():
            raise NasqError(f"plan {path} not found; write one with `nasq finalize RUN --out {path}` or a baseline")
        return cls.from_dict(read_json(path, what="plan", expect=None), str(path))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``plan.json`` atomically; refuses to replace an existing file unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise NasqError(f"{path} already exists; pass --overwrite to replace it")
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _tensor_from_dict(d: Any, where: str) -> PlanTensor:
    if not isinstance(d, dict):
        raise NasqError(f"{where}: must be an object, got {type(d).__name__}")
    missing = [k for k in _TENSOR_KEYS if k not in d]
    if missing:
        raise NasqError(f"{where}: missing key(s) {', '.join(missing)}")
    unknown = sorted(set(d) - set(_TENSOR_KEYS) - {"rule"})
    if unknown:
        raise NasqError(f"{where}: unknown key(s) {', '.join(unknown)}")

    def int_list(key: str, lo: int, hi: int | None = None, empty: bool = False) -> tuple[int, ...]:
        v = d[key]
        ok = isinstance(v, list) and (empty or v) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= lo and (hi is None or x <= hi) for x in v)
        if not ok:
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise NasqError(f"{where}.{key}: must be a {'possibly empty' if empty else 'non-empty'} list of "
                            f"integers {rng}, got {v!r}")
        return tuple(v)

    def pos_int(key: str, lo: int = 1) -> int:
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise NasqError(f"{where}.{key}: must be an integer >= {lo}, got {v!r}")
        return v

    path = d["path"]
    if not isinstance(path, str) or not path:
        raise NasqError(f"{where}.path: must be a non-empty string, got {path!r}")
    where = f"{where} ({path})"
    kind = d["kind"]
    if kind not in ("linear", "embedding"):
        raise NasqError(f"{where}.kind: must be 'linear' or 'embedding', got {kind!r}")
    if not isinstance(d["has_bias"], bool):
        raise NasqError(f"{where}.has_bias: must be true or false, got {d['has_bias']!r}")
    if kind == "embedding" and d["has_bias"]:
        raise NasqError(f"{where}.has_bias: embeddings have no bias")
    rows, cols = pos_int("rows"), pos_int("cols")
    sizes = int_list("group_sizes", 1)
    choices = int_list("choices", 0, 8)
    bits = int_list("bits", 0, 8)
    pruned = int_list("pruned_groups", 0, empty=True)
    nbytes = pos_int("bytes", 0)
    if sum(sizes) != rows:
        raise NasqError(f"{where}.group_sizes: sum to {sum(sizes)}, but rows is {rows}")
    if len(bits) != len(sizes):
        raise NasqError(f"{where}.bits: {len(bits)} bit widths for {len(sizes)} groups; give one per group")
    bad = sorted({b for b in bits if b not in choices})
    if bad:
        raise NasqError(f"{where}.bits: {bad} not among the tensor's choices {list(choices)}")
    expect_pruned = tuple(g for g, b in enumerate(bits) if b == 0)
    if tuple(pruned) != expect_pruned:
        raise NasqError(f"{where}.pruned_groups: {list(pruned)} but the groups with 0 bits are "
                        f"{list(expect_pruned)}")
    rule = d.get("rule", "")
    if not isinstance(rule, str):
        raise NasqError(f"{where}.rule: must be a string, got {rule!r}")
    t = PlanTensor(path=path, kind=kind, rows=rows, cols=cols, has_bias=d["has_bias"], group_sizes=sizes,
                   choices=choices, bits=bits, pruned_groups=pruned, bytes=nbytes, rule=rule)
    expect = plan_size_bytes([t.searched()], [bits])
    if nbytes != expect:
        old = sorted({b for b in bits if b in V1_REPACKED_WIDTHS})
        why = ("the file was edited by hand or written by an incompatible nasq" if not old else
               f"nasq before dense packing counted its {'/'.join(map(str, old))}-bit groups in 4- or 8-bit "
               "containers, this nasq counts b bits per weight: re-create the plan with this nasq (`nasq finalize` "
               "or `nasq baseline`)")
        raise NasqError(f"{where}.bytes: {nbytes}, but the cost model gives {expect} for these bits; {why}")
    return t


# --------------------------------------------------------------------------------------------------- creation


def make_plan(
    tensors: Sequence[SearchedTensor],
    bits_per_group: Sequence[Sequence[int]],
    *,
    space: SearchSpace | SpaceInfo,
    budget: Budget | None,
    param_shapes: Mapping[str, Sequence[int]] | None,
    provenance: Mapping[str, Any],
) -> Plan:
    """Build a :class:`Plan` with every size from :mod:`nasq.contract.cost`.

    Totals (bytes): ``searched_bytes`` = :func:`plan_size_bytes`; ``encoder_linear_bytes`` =
    :func:`encoder_linear_nbytes` (the "encoder weights" convention); ``fixed_bytes`` = :func:`fixed_nbytes` of
    ``param_shapes`` (None without them); ``artifact_tensor_bytes = searched + fixed`` (the whole artifact's
    tensors); ``avg_bits`` (weight-weighted, pruned = 0), ``pruned_fraction`` (of the searched weights),
    ``budget_bytes`` / ``within_budget`` (``searched_bytes <= budget.bytes``), ``fp32_searched_bytes``.
    ``provenance`` gets ``created``, ``nasq_version``, ``git_rev`` added unless given; it should contain
    ``method`` (``nasq-search``, ``uniform``, ``hessian``, ...), ``run`` and ``step``.
    """
    info = SpaceInfo.of(space)
    bits = [tuple(int(b) for b in bb) for bb in bits_per_group]
    searched = plan_size_bytes(tensors, bits, check_choices=True)
    pts = []
    for t, bb in zip(tensors, bits, strict=True):
        pts.append(PlanTensor(path=t.path, kind=t.kind, rows=t.rows, cols=t.cols, has_bias=t.has_bias,
                              group_sizes=tuple(t.group_sizes), choices=tuple(t.choices), bits=bb,
                              pruned_groups=tuple(g for g, b in enumerate(bb) if b == 0),
                              bytes=plan_size_bytes([t], [bb]), rule=t.rule))
    fixed = None if param_shapes is None else fixed_nbytes(param_shapes, tensors, info)
    n = sum(t.num_weights for t in tensors)
    pruned_w = sum(r * t.cols for t, bb in zip(tensors, bits) for r, b in zip(t.group_sizes, bb) if b == 0)
    totals = {
        "searched_bytes": searched,
        "encoder_linear_bytes": encoder_linear_nbytes(tensors, bits),
        "fixed_bytes": fixed,
        "artifact_tensor_bytes": None if fixed is None else searched + fixed,
        "avg_bits": avg_bits(tensors, bits),
        "pruned_fraction": pruned_w / n if n else 0.0,
        "budget_bytes": None if budget is None else budget.bytes,
        "within_budget": None if budget is None else searched <= budget.bytes,
        "fp32_searched_bytes": fp32_nbytes(tensors),
    }
    prov = {"method": None, "run": None, "step": None,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "nasq_version": __version__, "git_rev": git_rev(), **dict(provenance)}
    bud = None if budget is None else {"bytes": budget.bytes, "convention": budget.convention,
                                       "source": budget.source, "fixed_bytes": budget.fixed_bytes}
    return Plan(quant_mode=info.quant_mode, space={"name": info.name, "source": info.source},
                activations=dict(info.activations), fixed=info.fixed, tensors=tuple(pts), budget=bud,
                totals=totals, provenance=_jsonable(prov))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x
