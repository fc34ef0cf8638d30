"""Measured damages: the per-(tensor, width) output damage a measured plan carries, and its share per row group.

``nasq baseline measured`` (:mod:`nasq.baselines.measured`) measures, for every searched tensor ``t`` and choice
``c``, ``D_t(c)``: the mean KL of the fine-tuned model's output when only ``t`` is quantized at ``c`` bits. The
plan it writes records them in its provenance as ``damage_kl_x1000[path][str(c)] = 1000 * D_t(c)``, so one
measurement serves every consumer: the measured allocation at any budget (``--damage-from``), the search's
damage prior (``search.damage_prior``, :mod:`nasq.search.loop`) and the prediction for any plan of the same
model (:func:`plan_prediction`, ``nasq inspect|compare --damage-from``). Several measured plans of one model and
space (measurements on different rows, e.g. other seeds) pool into one estimate, their damages averaged with each
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
from dataclasses import replace
from pathlib import Path

import numpy as np

from nasq.contract.cost import plan_size_bytes, uniform_plan
from nasq.contract.plan import Plan
from nasq.contract.space import SearchedTensor
from nasq.errors import NasqError
from nasq.io import finite_number

__all__ = ["DamageSource", "check_measured_plan", "damage_from_plan", "group_damage", "load_damage",
           "load_pooled_damage", "measured_sources", "plan_prediction", "pooled_damage", "predicted_damage",
           "uniform_reference", "uniform_width"]

MAX_DAMAGE_X1000 = 1e9  # 1e6 nats of output KL: far above any model's (a 2-class output's is tens of nats)
MAX_ROWS = 10**12  # measured rows a plan may claim (pooling weights)

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
            vals.append(_damage_value(v, f"{source}: damage_kl_x1000[{t.path!r}][{str(int(c))!r}]") / 1000)
        out.append(np.asarray(vals, np.float64))
    return out


def _damage_value(v, where: str) -> float:
    """A damage read from an untrusted file: a finite number in [0, MAX_DAMAGE_X1000] (x1000 nats), where a tiny
    negative (>= -1e-6, a rounded KL of plans made before measurements were clamped at 0) reads as 0."""
    f = finite_number(v)
    if f is None or not -1e-6 <= f <= MAX_DAMAGE_X1000:
        raise NasqError(f"{where} must be a finite number in [0, {MAX_DAMAGE_X1000:.0e}] (x1000 nats), got "
                        f"{str(v)[:40]}; give a measured plan made by `nasq baseline measured`")
    return max(f, 0.0)


def valid_rows(rows) -> int | None:
    """``rows`` if it is a measured row count (a positive integer up to ``MAX_ROWS``), else ``None``."""
    ok = isinstance(rows, int) and not isinstance(rows, bool) and 1 <= rows <= MAX_ROWS
    return rows if ok else None


def measured_rows(provenance: dict, source: str) -> int:
    """The rows a measured plan's damages were averaged over (``provenance["rows"]``, a positive integer)."""
    rows = provenance.get("rows")
    if valid_rows(rows) is None:
        raise NasqError(f"{source}: its provenance has no measured row count ('rows', a positive integer up to "
                        f"{MAX_ROWS:.0e}), so its "
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
    table = plan.provenance.get("damage_kl_x1000")
    for t in tensors:
        m = measured.get(t.path)
        if m is None and isinstance(table, dict) and t.path in table:
            raise NasqError(f"{source}: it has damages of {t.path} but not the tensor itself (its shape and row "
                            "groups), so they cannot be checked against this model; give a plan written by `nasq "
                            "baseline measured`")
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
        (prov, source), = measured_sources([path], tensors, what, quant_mode=quant_mode)
        return damage_from_plan(prov, tensors, source)
    return load_pooled_damage(path, tensors, what, quant_mode=quant_mode)[0]


def load_pooled_damage(paths: Sequence[str | Path], tensors: Sequence[SearchedTensor], what: str = "", *,
                       quant_mode: str) -> tuple[list[np.ndarray], int]:
    """:func:`pooled_damage` of the measured plan files ``paths`` (each validated by ``Plan.load`` and
    :func:`check_measured_plan`)."""
    return pooled_damage(measured_sources(paths, tensors, what, quant_mode=quant_mode), tensors)


def measured_sources(paths: Sequence[str | Path], tensors: Sequence[SearchedTensor], what: str = "", *,
                     quant_mode: str) -> list[tuple[dict, str]]:
    """``(provenance, source)`` of each measured plan file in ``paths``, each validated by ``Plan.load`` and
    :func:`check_measured_plan` against ``tensors``; ``source`` is the file, after ``what``."""
    plans = [Plan.load(p) for p in paths]
    for p in plans:
        check_measured_plan(p, tensors, quant_mode, f"{what}{p.source}")
    return [(p.provenance, f"{what}{p.source}") for p in plans]


def group_damage(tensors: Sequence[SearchedTensor], damage: Sequence[np.ndarray],
                 shares: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """``d_{g,c} = D_t(c) * s_{g,c}`` (``[G, C]`` per tensor, float64): each group's share of its tensor's measured
    damage. ``shares`` (``[G, C]`` per tensor, each column summing to 1) default to the rows,
    ``s_{g,c} = rows_g / rows_t``; any shares leave a tensor's damage at one width for all its groups at
    ``D_t(c)``, what was measured."""
    if shares is None:
        return [np.asarray(d, np.float64)[None, :] * (np.asarray(t.group_sizes, np.float64) / t.rows)[:, None]
                for t, d in zip(tensors, damage, strict=True)]
    return [np.asarray(d, np.float64)[None, :] * np.asarray(s, np.float64)
            for d, s in zip(damage, shares, strict=True)]


def predicted_damage(tensors: Sequence[SearchedTensor], damage: Sequence[np.ndarray],
                     bits: Sequence[Sequence[int]], shares: Sequence[np.ndarray] | None = None) -> float:
    """``sum_t sum_g D_t(bits[t][g]) * s_{g, bits[t][g]}`` (:func:`group_damage`; by default ``s = rows_g /
    rows_t``): a plan's output KL (nats) as the additive model predicts it from the measured damages (before
    QAT)."""
    return float(sum(g[np.arange(t.num_groups), [t.choices.index(int(b)) for b in row]].sum()
                     for t, g, row in zip(tensors, group_damage(tensors, damage, shares), bits, strict=True)))


def uniform_width(tensors: Sequence[SearchedTensor], budget_bytes: int) -> int | None:
    """The widest non-zero width every tensor offers whose uniform plan fits ``budget_bytes`` (``None``: none)."""
    common = set.intersection(*({int(c) for c in t.choices} for t in tensors)) - {0} if tensors else set()
    for w in sorted(common, reverse=True):
        if plan_size_bytes(tensors, uniform_plan(tensors, w)) <= budget_bytes:
            return w
    return None


def uniform_reference(tensors: Sequence[SearchedTensor], damage: Sequence[np.ndarray],
                      budget_bytes: int) -> tuple[int, float] | None:
    """``(width, predicted damage)`` of the widest uniform plan within ``budget_bytes`` (:func:`uniform_width`),
    or ``None`` where no uniform plan fits."""
    w = uniform_width(tensors, budget_bytes)
    return None if w is None else (w, predicted_damage(tensors, damage, uniform_plan(tensors, w)))


def plan_prediction(plan: Plan, source: DamageSource, *, top: int = 5) -> dict:
    """What the additive model predicts for ``plan`` (any method's: uniform, rule, Hessian, search, measured) from
    the damages of the measured plan(s) ``source`` of the same model, quantizer and row groups::

        KL(plan) = sum_t sum_g D_t(c_g) rows_g / rows_t           (nats; before QAT, not a result)

    beside the same sum for the widest uniform width that fits the plan's budget (its own searched bytes when it
    records none), and the share of uniform's predicted damage the plan removes, ``1 - KL(plan) / KL(uniform)``.
    Only the widths a plan uses (and the uniform width) need measured damages; a plan with a width or a tensor the
    measurement lacks is a ``NasqError`` naming the file. Returns ``{"source", "rows", "plan_kl_x1000",
    "top_tensors": [(path, kl_x1000)] (the ``top`` largest), "uniform": {"bits", "kl_x1000"} | None,
    "removed_share" | None}`` (``uniform["kl_x1000"]`` is ``None``, with a ``note``, where that width was not
    measured); ``rows`` is the measured rows (``None`` for a single plan that does not record
    them)."""
    paths = [source] if isinstance(source, str | Path) else list(source)
    if not paths:
        raise NasqError("a prediction needs at least one measured plan (--damage-from PLAN.json)")
    searched = [t.searched() for t in plan.tensors]
    sources = measured_sources(paths, searched, quant_mode=plan.quant_mode)

    def damages(tensors):
        if len(sources) == 1:
            return damage_from_plan(sources[0][0], tensors, sources[0][1]), valid_rows(sources[0][0].get("rows"))
        return pooled_damage(sources, tensors)

    used = [replace(s, choices=tuple(sorted({int(b) for b in t.bits})))
            for s, t in zip(searched, plan.tensors, strict=True)]
    bits = [t.bits for t in plan.tensors]
    damage, rows = damages(used)
    per = [(t.path, 1000 * predicted_damage([t], [d], [b])) for t, d, b in zip(used, damage, bits, strict=True)]
    kl = sum(v for _, v in per)
    budget = plan.budget["bytes"] if plan.budget else plan_size_bytes(searched, bits, check_choices=False)
    uniform = None
    if (w := uniform_width(searched, budget)) is not None:
        at_w = [replace(s, choices=(w,)) for s in searched]
        try:
            kl_w = predicted_damage(at_w, damages(at_w)[0], uniform_plan(at_w, w))
            uniform = {"bits": w, "kl_x1000": 1000 * kl_w}
        except NasqError as e:  # the plan's own prediction stands; only the reference lacks its width
            uniform = {"bits": w, "kl_x1000": None, "note": str(e)}
    ref = uniform["kl_x1000"] if uniform else None
    removed = None if not ref or ref <= 0 else 1 - kl / ref
    if removed is not None and abs(removed) < 1e-9:  # the uniform plan itself: 0, not a rounding's -0.0000
        removed = 0.0
    return {"source": ", ".join(src for _, src in sources), "rows": rows, "plan_kl_x1000": kl,
            "top_tensors": sorted(per, key=lambda x: -x[1])[:top], "uniform": uniform, "removed_share": removed}
