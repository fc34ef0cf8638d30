"""A search run's result: what ``nasq finalize``, ``nasq inspect`` and QAT ``--init-from`` read.

Files in the run directory (written by the search loop at every checkpoint and at the end)::

    RUN/search_result.json   space, budget, cost kind (and, for a latency budget, the latency table it was
                             searched with), resolved tensors, parameter shapes, step, task
    RUN/alphas.safetensors   {tensor path: effective gate logits alpha - mu*k  [G, C]}
    RUN/scales.safetensors   {tensor path: LSQ steps of every (group, choice)  [G, C]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from nasq.contract.cost import Budget, LatencyTable, latency_table_dict, latency_table_from_dict
from nasq.contract.space import Fixed, SearchedTensor, SpaceInfo
from nasq.errors import NasqError
from nasq.io import load_safetensors, read_bytes, read_json, write_atomic

__all__ = ["ALPHAS", "SCALES", "SEARCH_RESULT", "SearchResult"]

SEARCH_RESULT = "search_result.json"
ALPHAS = "alphas.safetensors"
SCALES = "scales.safetensors"
_REQUIRED = ("space_source", "space_name", "quant_mode", "budget", "fixed", "tensors", "param_shapes", "step")
_DEFAULT_ACTIVATIONS = {"bits": 8, "granularity": "per_token"}


@dataclass(frozen=True)
class SearchResult:
    """The typed ``search_result.json`` (see the module docstring)."""

    space: SpaceInfo
    budget: Budget
    tensors: tuple[SearchedTensor, ...]
    param_shapes: dict[str, tuple[int, ...]] | None
    step: int | None
    cost_kind: str = "size"
    cost_budget: float | None = None
    num_labels: int | None = None
    task: str | None = None
    model_dir: str | None = None
    teacher: str | None = None
    latency: LatencyTable | None = None  # the table of a latency budget (``cost_kind == "latency"``)

    def to_dict(self) -> dict:
        s = self.space
        return {
            "space_source": s.source, "space_name": s.name, "quant_mode": s.quant_mode,
            "budget": {"bytes": self.budget.bytes, "convention": self.budget.convention,
                       "source": self.budget.source, "fixed_bytes": self.budget.fixed_bytes},
            "cost_kind": self.cost_kind, "cost_budget": self.cost_budget,
            "fixed": s.fixed.model_dump(), "activations": dict(s.activations),
            "tensors": [t.to_dict() for t in self.tensors],
            "param_shapes": {k: list(v) for k, v in (self.param_shapes or {}).items()},
            "step": self.step, "num_labels": self.num_labels, "task": self.task,
            "model_dir": self.model_dir, "teacher": self.teacher,
            "latency": latency_table_dict(self.latency) if self.latency is not None else None,
        }

    @classmethod
    def from_dict(cls, res: object, source: str) -> SearchResult:
        """Validate a loaded ``search_result.json``; errors name ``source`` and the key."""
        if not isinstance(res, dict):
            raise NasqError(f"{source}: the top level must be a JSON object")
        missing = [k for k in _REQUIRED if k not in res]
        if missing:
            raise NasqError(f"{source}: missing key(s) {', '.join(missing)}; the search run is incomplete or "
                            "from another nasq version")
        if not isinstance(res["tensors"], list):
            raise NasqError(f"{source}: 'tensors' must be a list")
        tensors = tuple(SearchedTensor.from_dict(d, f"{source}: tensors[{i}]") for i, d in enumerate(res["tensors"]))
        b = res["budget"]
        try:
            budget = Budget(bytes=int(b["bytes"]), convention=b["convention"], source=str(b.get("source", "search")),
                            fixed_bytes=int(b.get("fixed_bytes") or 0))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise NasqError(f"{source}: invalid 'budget' {b!r} ({e})") from None
        try:
            fixed = Fixed.model_validate(res["fixed"])
        except ValidationError as e:
            raise NasqError(f"{source}: invalid 'fixed': {e}") from None
        space = SpaceInfo(name=str(res["space_name"]), source=str(res["space_source"]), quant_mode=res["quant_mode"],
                          activations=res.get("activations") or dict(_DEFAULT_ACTIVATIONS), fixed=fixed)
        try:
            shapes = {str(k): tuple(int(x) for x in v) for k, v in res["param_shapes"].items()} or None
        except (AttributeError, TypeError, ValueError) as e:
            raise NasqError(f"{source}: invalid 'param_shapes' ({e})") from None
        cost_kind = res.get("cost_kind", "size")
        if cost_kind not in ("size", "latency"):
            raise NasqError(f"{source}: invalid 'cost_kind' {cost_kind!r} (size or latency)")
        cost_budget = res.get("cost_budget")
        if cost_budget is not None and (isinstance(cost_budget, bool) or not isinstance(cost_budget, int | float)
                                        or not math.isfinite(cost_budget)):
            raise NasqError(f"{source}: invalid 'cost_budget' {cost_budget!r} (a finite number)")
        latency = res.get("latency")
        if latency is not None:
            latency = latency_table_from_dict(latency, f"{source}: latency")
        return cls(space=space, budget=budget, tensors=tensors, param_shapes=shapes, step=res.get("step"),
                   cost_kind=cost_kind, cost_budget=cost_budget,
                   num_labels=res.get("num_labels"), task=res.get("task"), model_dir=res.get("model_dir"),
                   teacher=res.get("teacher"), latency=latency)

    # ------------------------------------------------------------------------------------------ files
    def save(self, run_dir: str | Path, alphas: Mapping[str, np.ndarray], scales: Mapping[str, np.ndarray]) -> None:
        """Write the three files atomically (arrays first: the JSON names a complete result)."""
        from safetensors.numpy import save

        run_dir = Path(run_dir)
        write_atomic(run_dir / ALPHAS, save({k: np.asarray(v) for k, v in alphas.items()}))
        write_atomic(run_dir / SCALES, save({k: np.asarray(v) for k, v in scales.items()}))
        write_atomic(run_dir / SEARCH_RESULT, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> tuple[SearchResult, list[np.ndarray]]:
        """``RUN/search_result.json`` and ``RUN/alphas.safetensors`` -> (result, gate logits in tensor order)."""
        run_dir = Path(run_dir)
        rpath = run_dir / SEARCH_RESULT
        if not rpath.is_file():
            raise NasqError(f"{run_dir} is not a finished search run: {rpath} not found; run `nasq search` "
                            "to completion first (or pass the search run directory)")
        result = cls.from_dict(read_json(rpath, what="search result"), str(rpath))
        apath = run_dir / ALPHAS
        if not apath.exists():
            raise NasqError(f"{apath} not found; the search run is incomplete")
        # gate logits are G x C float32 per tensor: bounded by the result's own tensors
        limit = 2**20 + sum(8 * t.num_groups * len(t.choices) + 256 for t in result.tensors)
        arrays = load_safetensors(read_bytes(apath, what="gate logits", max_bytes=limit), apath)
        alphas = []
        for t in result.tensors:
            if t.path not in arrays:
                raise NasqError(f"{apath} has no gate logits for {t.path}; the search run is incomplete or corrupt")
            a = np.asarray(arrays[t.path], np.float64)
            if a.shape != (t.num_groups, len(t.choices)):
                raise NasqError(f"{apath}: {t.path} has shape {a.shape}, expected {(t.num_groups, len(t.choices))}")
            if not np.all(np.isfinite(a)):
                raise NasqError(f"{apath}: gate logits of {t.path} are not finite; the search diverged")
            alphas.append(a)
        return result, alphas
