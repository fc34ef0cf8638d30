"""Measured damages: the per-(tensor, width) output damage a measured plan carries, and its share per row group.

``nasq baseline measured`` (:mod:`nasq.baselines.measured`) measures, for every searched tensor ``t`` and choice
``c``, ``D_t(c)``: the mean KL of the fine-tuned model's output when only ``t`` is quantized at ``c`` bits. The
plan it writes records them in its provenance as ``damage_kl_x1000[path][str(c)] = 1000 * D_t(c)``, so one
measurement serves every consumer: the measured allocation at any budget (``--damage-from``) and the search's
damage prior (``search.damage_prior``, :mod:`nasq.search.loop`). Several measured plans of one model and space
(measurements on different rows, e.g. other seeds) pool into one estimate, their damages averaged with each
plan's measured rows as weights (:func:`pooled_damage`): ``D_t(c) = sum_i rows_i D_t^i(c) / sum_i rows_i``.
A tensor's damage is spread over its row groups in proportion to their rows::

    d_{g,c} = D_{t(g)}(c) * rows_g / rows_{t(g)}

``D_t(c)`` depends on the tensor, the width, the quantizer and the row groups (one step per group), not on the
other widths a space offers, so a measurement serves any space of the same model, quantizer and row groups whose
widths it measured: one measurement in ``aqbert_128g_w12348`` ({1,2,3,4,8}) gives plans in ``aqbert_128g_w1234``,
``_w234`` and ``_w2348``, from avg 1.5 to avg 4 bits (:func:`check_measured_plan` refuses a plan of another
quantizer, model or grouping).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nasq.contract.plan import Plan
from nasq.contract.space import SearchedTensor
from nasq.errors import NasqError

__all__ = ["DamageSource", "check_measured_plan", "damage_from_plan", "group_damage", "load_damage",
           "load_pooled_damage", "pooled_damage"]

DamageSource = str | Path | Sequence[str | Path]
"""Where measured damages come from: one measured plan's path, or several to pool."""


def damage_from_plan(provenance: dict, tensors: Sequence[SearchedTensor], source: str) -> list[np.ndarray]:
    """The damages ``D_t(c)`` recorded in a measured plan's provenance (``damage_kl_x1000``), in the order of
    ``tensors``: one measurement, a plan at any budget. The plan file is untrusted: every searched tensor must be
    there with a finite, non-negative value for each of its choices (a measured plan of the same model and
    space), else ``NasqError`` naming ``source`` and the tensor."""
    if provenance.get("method") != "measured" or not isinstance(provenance.get("damage_kl_x1000"), dict):
        raise NasqError(f"{source}: not a measured plan (its provenance has no damage_kl_x1000); make one with "
                        "`nasq baseline measured`")
    table = provenance["damage_kl_x1000"]
    out = []
    for t in tensors:
        row = table.get(t.path)
        if not isinstance(row, dict):
            raise NasqError(f"{source}: no measured damage for tensor {t.path}; give a measured plan of the same "
                            "model and search space")
        vals = []
        for c in t.choices:
            v = row.get(str(int(c)))
            if v is None:
                raise NasqError(f"{source}: no measured damage of {t.path} at {int(c)} bits (measured: "
                                f"{', '.join(sorted(row, key=lambda k: (len(k), k)))}); give a measured plan whose "
                                "space has every width of this one (aqbert_128g_w12348 covers {1,2,3,4,8})")
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
                raise NasqError(f"{source}: damage_kl_x1000[{t.path!r}][{str(int(c))!r}] must be a finite number "
                                f">= 0, got {v!r}; give a measured plan made by `nasq baseline measured`")
            vals.append(float(v) / 1000)
        out.append(np.asarray(vals, np.float64))
    return out


def measured_rows(provenance: dict, source: str) -> int:
    """The rows a measured plan's damages were averaged over (``provenance["rows"]``, a positive integer)."""
    rows = provenance.get("rows")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise NasqError(f"{source}: its provenance has no measured row count ('rows', a positive integer), so its "
                        f"damages cannot be pooled with others; got {rows!r}. Give plans made by `nasq baseline "
                        "measured` (not re-solved with --damage-from)")
    return rows


def pooled_damage(sources: Sequence[tuple[dict, str]], tensors: Sequence[SearchedTensor]
                  ) -> tuple[list[np.ndarray], int]:
    """``(damages, rows)``: the damages of several measured plans' provenances (``(provenance, source)`` pairs,
    each checked by :func:`damage_from_plan`) averaged with their measured rows as weights, and the rows in all."""
    if not sources:
        raise NasqError("pooling measured damages needs at least one measured plan")
    rows = [measured_rows(prov, src) for prov, src in sources]
    total = sum(rows)
    damages = [damage_from_plan(prov, tensors, src) for prov, src in sources]
    return [sum(r * d[i] for r, d in zip(rows, damages, strict=True)) / total for i in range(len(tensors))], total


def check_measured_plan(plan: Plan, tensors: Sequence[SearchedTensor], quant_mode: str, source: str) -> None:
    """A measured plan's damages apply to ``tensors`` quantized with ``quant_mode`` only if it quantized the same
    way (the damage of ``c`` bits depends on the quantizer and on the row groups, one step each) and measured the
    same model: each searched tensor that the plan also holds has the same shape and row groups there; else
    ``NasqError`` naming ``source``."""
    if plan.quant_mode != quant_mode:
        raise NasqError(f"{source}: its damages were measured with quant_mode {plan.quant_mode!r}, but this space "
                        f"quantizes {quant_mode!r}, where the same width damages differently; measure again in "
                        "this space")
    measured = {t.path: t for t in plan.tensors}
    for t in tensors:
        m = measured.get(t.path)
        if m is None:
            continue  # damage_from_plan names a tensor without damages
        if (m.rows, m.cols) != (t.rows, t.cols):
            raise NasqError(f"{source}: tensor {t.path} is {m.rows}x{m.cols} there but {t.rows}x{t.cols} in this "
                            "model; give a measured plan of the same model")
        if tuple(m.group_sizes) != tuple(t.group_sizes):
            raise NasqError(f"{source}: tensor {t.path} was measured in {m.num_groups} row groups, this space has "
                            f"{t.num_groups} (a width's damage depends on the groups: one quantizer step each); "
                            "measure again in this space or one with the same groups")


def load_damage(path: DamageSource, tensors: Sequence[SearchedTensor], what: str = "", *,
                quant_mode: str) -> list[np.ndarray]:
    """:func:`damage_from_plan` of the measured plan file ``path`` (validated by ``Plan.load`` and
    :func:`check_measured_plan`), or of several files pooled (:func:`pooled_damage`); errors name the file, after
    ``what`` (e.g. ``"damage prior "``)."""
    if isinstance(path, str | Path):
        plan = Plan.load(path)
        check_measured_plan(plan, tensors, quant_mode, f"{what}{plan.source}")
        return damage_from_plan(plan.provenance, tensors, f"{what}{plan.source}")
    return load_pooled_damage(path, tensors, what, quant_mode=quant_mode)[0]


def load_pooled_damage(paths: Sequence[str | Path], tensors: Sequence[SearchedTensor], what: str = "", *,
                       quant_mode: str) -> tuple[list[np.ndarray], int]:
    """:func:`pooled_damage` of the measured plan files ``paths`` (each validated by ``Plan.load`` and
    :func:`check_measured_plan`)."""
    plans = [Plan.load(p) for p in paths]
    for p in plans:
        check_measured_plan(p, tensors, quant_mode, f"{what}{p.source}")
    return pooled_damage([(p.provenance, f"{what}{p.source}") for p in plans], tensors)


def group_damage(tensors: Sequence[SearchedTensor], damage: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``d_{g,c} = D_t(c) * rows_g / rows_t`` (``[G, C]`` per tensor, float64): each group's share of its tensor's
    measured damage."""
    return [np.asarray(d, np.float64)[None, :] * (np.asarray(t.group_sizes, np.float64) / t.rows)[:, None]
            for t, d in zip(tensors, damage, strict=True)]
