"""Inspect a bit allocation: per layer x module tables, JSON, markdown, Qwix/MaxText-style rules, plan diffs.

Sources (:func:`load_sourced_plan`):

* a ``plan.json`` file (or a directory holding one);
* a search run directory (``search_result.json`` + ``alphas.safetensors``): the per-group **argmax** of the gate
  logits, *before* the budget repair that ``nasq finalize`` does (it may be over budget);
* a fine-tune / QAT run directory: its ``model/plan.json``;
* an exported artifact directory: its ``plan.json`` plus the manifest's byte accounting.

Per tensor (:func:`tensor_stats`), with ``r_g`` the rows of group ``g`` and ``b_g`` its bits:

    avg_bits = sum_g r_g * b_g / sum_g r_g          (pruned = 0; the plan's weight-weighted mean per tensor)
    pruned   = sum_{g: b_g = 0} r_g / sum_g r_g
    share    = bytes / totals.searched_bytes

Budget in both conventions (:func:`budget_check`): ``budget.bytes`` is what the searched tensors may use, so the
whole-artifact budget is ``budget.bytes + totals.fixed_bytes`` (for an ``artifact``-convention budget that is the
figure the user gave).

With measured damages (``damage_from``: a plan of ``nasq baseline measured`` on the same model, or several pooled),
the table, markdown, JSON and the comparison add the plan's predicted output KL before QAT and the share of
uniform's predicted damage it removes (:func:`nasq.contract.damage.plan_prediction`): a way to rank candidate plans
of any method before spending QAT on them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nasq.contract.damage import DamageSource, plan_prediction
from nasq.contract.plan import Plan, PlanTensor, make_plan
from nasq.contract.search_result import SearchResult
from nasq.errors import NasqError
from nasq.export.reader import read_artifact_plan
from nasq.io import finite_number
from nasq.search.finalize import argmax_plan

__all__ = [
    "FORMATS",
    "MODULE_ORDER",
    "SourcedPlan",
    "as_sourced_plan",
    "budget_check",
    "compare_plans",
    "format_compare",
    "format_json",
    "format_markdown",
    "format_rules",
    "format_table",
    "histogram",
    "load_sourced_plan",
    "module_of",
    "parse_rules",
    "render",
    "rules",
    "summary",
    "tensor_stats",
]

FORMATS = ("table", "json", "md", "rules")
MODULE_ORDER = ("embeddings", "q", "k", "v", "o", "ffn_in", "ffn_out")
_MB = 10**6
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_SUFFIX = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
}


def module_of(path: str) -> tuple[int | None, str]:
    """``encoder.layer.3.attention.self.query`` -> ``(3, "q")``; ``embeddings.word_embeddings`` ->
    ``(None, "embeddings")``; anything else -> ``(None, path)``."""
    m = _LAYER.match(path)
    if m:
        return int(m.group(1)), _SUFFIX.get(m.group(2), m.group(2))
    if path.startswith("embeddings."):
        return None, "embeddings"
    return None, path


def _sort_key(path: str) -> tuple:
    layer, mod = module_of(path)
    order = MODULE_ORDER.index(mod) if mod in MODULE_ORDER else len(MODULE_ORDER)
    return (-1 if layer is None and mod == "embeddings" else (layer if layer is not None else 10**9), order, path)


# ------------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class SourcedPlan:
    """A plan to inspect and where it came from.

    ``kind``: ``plan`` | ``search`` | ``finetune`` | ``artifact``. ``note`` says how to read it (e.g. that a search
    run shows the pre-repair argmax). ``run_dir`` is the search run (for its ``metrics.jsonl``), ``manifest`` the
    artifact's ``manifest.json``.
    """

    plan: Plan
    source: str
    kind: str
    note: str = ""
    run_dir: Path | None = None
    manifest: dict | None = field(default=None)


def _search_argmax(run_dir: Path) -> SourcedPlan:
    res, alphas = SearchResult.load(run_dir)
    tensors = list(res.tensors)
    bits = argmax_plan(alphas, tensors)
    plan = make_plan(tensors, bits, space=res.space, budget=res.budget, param_shapes=res.param_shapes,
                     provenance={"method": "nasq-search-argmax", "run": str(run_dir), "step": res.step,
                                 "pre_repair_argmax": True, "git_rev": None})
    note = (f"pre-repair argmax of {run_dir / 'alphas.safetensors'} at step {res.step}: not a finalized "
            "plan and possibly over budget; `nasq finalize` solves the budget exactly")
    return SourcedPlan(plan=plan, source=str(run_dir), kind="search", note=note, run_dir=run_dir)


def load_sourced_plan(path: str | Path) -> SourcedPlan:
    """Read a plan.json, search run, fine-tune/QAT run or exported artifact (see the module docstring)."""
    p = Path(path)
    if p.is_file():
        return SourcedPlan(plan=Plan.load(p), source=str(p), kind="plan")
    if not p.is_dir():
        raise NasqError(f"{p} not found; pass a plan.json, a search run, a fine-tune run or an artifact directory")
    if (p / "manifest.json").is_file() and (p / "plan.json").is_file():
        manifest, plan = read_artifact_plan(p)
        return SourcedPlan(plan=plan, source=str(p), kind="artifact",
                          note="exported artifact: sizes from its manifest.json", manifest=manifest)
    if (p / "search_result.json").is_file():
        return _search_argmax(p)
    if (p / "model" / "plan.json").is_file():
        return SourcedPlan(plan=Plan.load(p / "model" / "plan.json"), source=str(p), kind="finetune",
                          note=f"QAT run: the plan in {p / 'model' / 'plan.json'}")
    if (p / "plan.json").is_file():
        return SourcedPlan(plan=Plan.load(p / "plan.json"), source=str(p), kind="plan")
    raise NasqError(f"{p}: no plan.json, model/plan.json, search_result.json or artifact manifest.json found; "
                    "pass a plan file, a search run, a QAT run (`nasq finetune --plan`) or an exported artifact")


def as_sourced_plan(x: SourcedPlan | Plan | str | Path) -> SourcedPlan:
    if isinstance(x, SourcedPlan):
        return x
    if isinstance(x, Plan):
        return SourcedPlan(plan=x, source=x.source, kind="plan")
    return load_sourced_plan(x)


# ------------------------------------------------------------------------------------------------ statistics


def histogram(t: PlanTensor) -> dict[int, int]:
    """``{bits: number of groups}`` in ascending bits."""
    return dict(sorted(Counter(t.bits).items()))


def tensor_stats(plan: Plan) -> list[dict]:
    """One record per plan tensor, ordered embeddings, layer 0 (q k v o ffn_in ffn_out), layer 1, ...:
    ``path, layer, module, kind, rows, cols, groups, avg_bits, histogram, pruned_frac, bytes, share``."""
    total = plan.totals.get("searched_bytes") or sum(t.bytes for t in plan.tensors) or 1
    out = []
    for t in sorted(plan.tensors, key=lambda t: _sort_key(t.path)):
        layer, mod = module_of(t.path)
        rows = sum(t.group_sizes)
        out.append({
            "path": t.path, "layer": layer, "module": mod, "kind": t.kind, "rows": t.rows, "cols": t.cols,
            "groups": t.num_groups,
            "avg_bits": sum(r * b for r, b in zip(t.group_sizes, t.bits, strict=True)) / rows,
            "histogram": {str(b): n for b, n in histogram(t).items()},
            "pruned_frac": sum(r for r, b in zip(t.group_sizes, t.bits, strict=True) if b == 0) / rows,
            "bytes": t.bytes, "share": t.bytes / total, "bits": list(t.bits),
        })
    return out


def budget_check(plan: Plan) -> dict:
    """Sizes vs budget in both conventions (bytes; ``None`` where unknown).

    ``encoder``: searched tensors (``searched_bytes``; ``encoder_linear_bytes`` is its encoder-linear part) vs
    ``budget.bytes``. ``artifact``: ``artifact_tensor_bytes`` vs ``budget.bytes + fixed_bytes``. ``latency``
    (a plan made under a latency budget, else ``None``): the plan's ms on its table vs the budget's.
    """
    tot = plan.totals
    searched, fixed = tot.get("searched_bytes"), tot.get("fixed_bytes")
    artifact = tot.get("artifact_tensor_bytes")
    if artifact is None and fixed is not None:
        artifact = searched + fixed
    b = plan.budget
    enc_budget = None if b is None else int(b["bytes"])
    art_budget = None if enc_budget is None or fixed is None else enc_budget + int(fixed)
    return {
        "budget_source": None if b is None else b.get("source"),
        "budget_convention": None if b is None else b.get("convention"),
        "encoder": {"searched_bytes": searched, "encoder_linear_bytes": tot.get("encoder_linear_bytes"),
                    "budget_bytes": enc_budget,
                    "within": None if enc_budget is None else searched <= enc_budget},
        "artifact": {"tensor_bytes": artifact, "fixed_bytes": fixed, "budget_bytes": art_budget,
                     "within": None if art_budget is None or artifact is None else artifact <= art_budget},
        "latency": _latency_check(plan.provenance),
    }


def _latency_check(prov: dict) -> dict | None:
    ms, budget = prov.get("latency_ms"), prov.get("latency_budget_ms")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (ms, budget)):
        return None
    return {"ms": ms, "budget_ms": budget, "within": ms <= budget, "table": prov.get("latency_table")}


def method_recipe(provenance: dict) -> list[str]:
    """What a ``hessian`` plan's method was run with, e.g. ``["fisher curvature", "per weight"]`` (what ``nasq
    baseline fisher --granularity weight`` makes; with ``--shrinkage 0.5`` also ``"shrunk 0.5 toward per
    tensor"``), else ``[]``. The plan file is untrusted: a value that is not a short lowercase word
    is left out."""
    if provenance.get("method") != "hessian":
        return []

    def word(key: str) -> str | None:
        v = provenance.get(key)
        return v if isinstance(v, str) and re.fullmatch(r"[a-z]{1,16}", v) else None
    curvature, granularity = word("curvature"), word("granularity")
    shrinkage = finite_number(provenance.get("shrinkage"))
    out = ([f"{curvature} curvature"] * (curvature is not None)
           + [f"per {'row group' if granularity == 'group' else granularity}"] * (granularity is not None))
    if shrinkage is not None and 0 < shrinkage <= 1:
        out.append(f"shrunk {shrinkage:g} toward per tensor")
    return out


def summary(alloc: SourcedPlan | Plan | str | Path, damage_from: DamageSource | None = None) -> dict:
    """Everything :func:`format_json` prints: source, kind, note, per-tensor stats, totals, budgets, manifest, and
    with ``damage_from`` the :func:`~nasq.contract.damage.plan_prediction` (key ``prediction``)."""
    a = as_sourced_plan(alloc)
    p = a.plan
    out = {"source": a.source, "kind": a.kind, "note": a.note, "method": p.provenance.get("method"),
           "recipe": method_recipe(p.provenance), "space": p.space, "quant_mode": p.quant_mode,
           "fixed": p.fixed.model_dump(),
           "tensors": tensor_stats(p), "totals": dict(p.totals), "budget": p.budget, "budget_check": budget_check(p)}
    if a.manifest is not None:
        m = a.manifest
        out["manifest"] = {k: m.get(k) for k in ("tensor_bytes", "predicted_bytes", "payload_vs_predicted",
                                                 "searched_tensor_bytes", "searched_predicted_bytes", "task")}
    if damage_from is not None:
        out["prediction"] = plan_prediction(p, damage_from)
    return out


# ------------------------------------------------------------------------------------------------ formats


def _mb(x: int | None) -> str:
    return "?" if x is None else f"{x / _MB:.4f} MB"


def _pct(used: int | None, budget: int | None) -> str:
    if used is None or budget is None:
        return ""
    verdict = "within" if used <= budget else f"OVER by {(used - budget) / _MB:.4f} MB"
    return f"  ({100 * used / budget:.1f}% of budget, {verdict})" if budget else f"  ({verdict})"


def _totals_lines(s: dict) -> list[str]:
    t, bc = s["totals"], s["budget_check"]
    enc, art = bc["encoder"], bc["artifact"]
    fp32 = t.get("fp32_searched_bytes")
    ratio = f", {fp32 / t['searched_bytes']:.2f}x smaller than fp32" if fp32 and t.get("searched_bytes") else ""
    lines = [
        (f"searched tensors:        {t.get('searched_bytes', 0):,} B = {_mb(t.get('searched_bytes'))}, avg "
        f"{t.get('avg_bits', 0):.3f} bits, {100 * (t.get('pruned_fraction') or 0):.1f}% of weights pruned{ratio}"),
        f"  of which encoder linears: {_mb(enc['encoder_linear_bytes'])}",
        f"whole artifact tensors:  {_mb(art['tensor_bytes'])} (fixed, unsearched: {_mb(art['fixed_bytes'])})",
    ]
    if bc["budget_convention"] is None:
        lines.append("budget: none recorded in the plan")
    else:
        lines.append(f"budget {bc['budget_source']} (given as convention '{bc['budget_convention']}'):")
        lines.append(f"  encoder convention (searched tensors): used {_mb(enc['searched_bytes'])} of "
                     f"{_mb(enc['budget_bytes'])}{_pct(enc['searched_bytes'], enc['budget_bytes'])}")
        lines.append(f"  artifact convention (all tensors):     used {_mb(art['tensor_bytes'])} of "
                     f"{_mb(art['budget_bytes'])}{_pct(art['tensor_bytes'], art['budget_bytes'])}")
    if (lat := bc.get("latency")) is not None:
        where = f" on {lat['table']}" if lat.get("table") else ""
        lines.append(f"latency budget{where}: {lat['ms']:.4f} ms of {lat['budget_ms']:.4f} ms  "
                     f"({'within' if lat['within'] else 'OVER'})")
    m = s.get("manifest")
    if m:
        lines.append(f"artifact manifest: tensor payload {m['tensor_bytes']:,} B, predicted {m['predicted_bytes']:,} B "
                     f"(ratio {m['payload_vs_predicted']}), searched {m['searched_tensor_bytes']:,} B")
    if s.get("prediction"):
        lines += prediction_lines(s["prediction"])
    return lines


def prediction_lines(pred: dict) -> list[str]:
    """Plain text of a :func:`~nasq.contract.damage.plan_prediction`."""
    rows = f", {pred['rows']:,} rows" if pred.get("rows") else ""
    lines = [(f"predicted output KL before QAT (additive, measured damages of {pred['source']}{rows}): "
             f"{pred['plan_kl_x1000']:.2f} x1000 nats")]
    u = pred.get("uniform")
    if u is None:
        lines.append("  uniform reference: no uniform width fits this plan's budget")
    elif u["kl_x1000"] is None:
        lines.append(f"  uniform {u['bits']}-bit reference: not measured ({u['note']})")
    else:
        r = pred["removed_share"]
        share = ("" if r is None else f"; the plan removes {100 * r:.0f}% of it" if r >= 0
                 else f"; the plan adds {-100 * r:.0f}% to it")
        lines.append(f"  uniform {u['bits']}-bit within the same budget: {u['kl_x1000']:.2f} x1000 nats{share}")
    if pred["top_tensors"]:
        lines.append("  largest shares: " + ", ".join(f"{p} {v:.2f}" for p, v in pred["top_tensors"]))
    return lines


def _header_lines(s: dict) -> list[str]:
    method = ", ".join([f"method {s['method']}", *s["recipe"]])
    lines = [f"{s['kind']}: {s['source']}  ({method}, space {s['space'].get('name')}, {s['quant_mode']})"]
    if s["note"]:
        lines.append(f"NOTE: {s['note']}")
    return lines


_COLS = ("layer", "module", "groups", "avg bits", "pruned", "bytes", "share", "histogram (bits:groups)")


def _cells(r: dict) -> list[str]:
    return ["-" if r["layer"] is None else str(r["layer"]), r["module"], str(r["groups"]), f"{r['avg_bits']:.2f}",
            f"{100 * r['pruned_frac']:.1f}%", f"{r['bytes']:,}", f"{100 * r['share']:.1f}%",
            " ".join(f"{b}:{n}" for b, n in r["histogram"].items())]


def format_table(alloc: SourcedPlan | Plan | str | Path, damage_from: DamageSource | None = None) -> str:
    """Plain-text table, one row per tensor (layer x module), then totals and budgets (and the prediction)."""
    s = summary(alloc, damage_from)
    rows = [_cells(r) for r in s["tensors"]]
    w = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLS)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()

    out = _header_lines(s) + ["", line(_COLS), line(["-" * x for x in w])]
    prev: object = object()
    for r, cells in zip(s["tensors"], rows, strict=True):
        out.append(line(cells if r["layer"] != prev else ["", *cells[1:]]))  # layer index once per block
        prev = r["layer"]
    return "\n".join(out + [""] + _totals_lines(s)) + "\n"


def format_markdown(alloc: SourcedPlan | Plan | str | Path, damage_from: DamageSource | None = None) -> str:
    """A markdown table (one row per tensor) plus the totals as a list."""
    s = summary(alloc, damage_from)
    out = [f"**{line}**" if i == 0 else f"> {line}" for i, line in enumerate(_header_lines(s))] + [""]
    out.append("| " + " | ".join(_COLS) + " |")
    out.append("|" + "|".join("---:" if i in {0, 2, 3, 4, 5, 6} else "---" for i in range(len(_COLS))) + "|")
    for r in s["tensors"]:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    out += [""] + [f"- {x.strip()}" for x in _totals_lines(s)]
    return "\n".join(out) + "\n"


def format_json(alloc: SourcedPlan | Plan | str | Path, damage_from: DamageSource | None = None) -> str:
    """:func:`summary` as indented JSON."""
    return json.dumps(summary(alloc, damage_from), indent=1) + "\n"


# ------------------------------------------------------------------------------------------------ rules


def _layer_glob(path: str) -> str:
    return _LAYER.sub(lambda m: f"encoder.layer.*.{m.group(2)}", path)


def rules(plan: Plan, *, merge_layers: bool = True, include_fixed: bool = True) -> list[dict]:
    """Ordered rules ``{"pattern", "weight_bits" | "bits", ...}``; the first rule whose pattern matches a module
    path wins. Patterns are :func:`nasq.contract.space.match_path` globs over the dotted paths (``fnmatch`` per
    component: ``*`` stays inside one component, ``**`` = any number of components; dots are literal), like
    Qwix's / MaxText's module-path rules (regex users: escape the dots, ``*`` -> ``[^.]*``, ``**`` -> ``.*``).

    * all groups of a tensor at one width -> ``{"pattern": path, "weight_bits": b}``;
    * otherwise one rule per tensor: ``{"pattern": path, "bits": [per group], "group_sizes": [...]}`` (row groups
      of the ``(out, in)`` weight, contiguous, in order);
    * ``merge_layers``: uniform tensors of the same module in every layer with the same width collapse to
      ``encoder.layer.*.<module>``;
    * ``include_fixed``: trailing rules for the unsearched tensors (``fixed: true``; 32 = fp32, 8 = int8 per row).
    """
    ordered = sorted(plan.tensors, key=lambda t: _sort_key(t.path))
    uniform = {t.path: len(set(t.bits)) == 1 for t in ordered}
    merged: dict[str, int] = {}
    if merge_layers:
        by_glob: dict[str, list[PlanTensor]] = {}
        for t in ordered:
            if _LAYER.match(t.path):
                by_glob.setdefault(_layer_glob(t.path), []).append(t)
        for glob, ts in by_glob.items():
            widths = {t.bits[0] for t in ts}
            if len(ts) > 1 and all(uniform[t.path] for t in ts) and len(widths) == 1:
                merged[glob] = widths.pop()
    out: list[dict] = []
    emitted: set[str] = set()
    for t in ordered:
        glob = _layer_glob(t.path)
        if glob in merged:
            if glob not in emitted:
                emitted.add(glob)
                out.append({"pattern": glob, "weight_bits": merged[glob]})
            continue
        if uniform[t.path]:
            out.append({"pattern": t.path, "weight_bits": t.bits[0]})
        else:
            out.append({"pattern": t.path, "bits": list(t.bits), "group_sizes": list(t.group_sizes)})
    if include_fixed:
        f = plan.fixed
        paths = set(plan.paths)
        fixed = [("embeddings.word_embeddings", f.word_embeddings_bits, "word embeddings (int8 per row at 8)"),
                 ("embeddings.*", f.other_embeddings_bits, "other embeddings (position, token type)"),
                 ("**", f.unsearched_linear_bits, "every other linear (pooler, classifier)")]
        for pat, b, what in fixed:
            if pat in paths:  # searched after all: its plan rule above already applies
                continue
            out.append({"pattern": pat, "weight_bits": b, "fixed": True, "what": what})
    return out


RULES_HEADER = (
    "# nasq bit rules: ordered, the FIRST rule whose pattern matches a module path wins; patterns are fnmatch "
    "globs over HF-style module paths, matched per dotted component (`*` = within one component, `**` = any number of components). weight_bits = every row group at that width "
    "(0 = pruned, 1 = binary, 32 = fp32); bits = one width per contiguous row group (output features), sizes "
    "in group_sizes; fixed = not searched (from the plan's 'fixed')."
)


def format_rules(alloc: SourcedPlan | Plan | str | Path) -> str:
    """The header comment, then a JSON list with one rule per line."""
    a = as_sourced_plan(alloc)
    body = ",\n ".join(json.dumps(r) for r in rules(a.plan))
    extra = f"# source: {a.source} ({a.kind}){'; ' + a.note if a.note else ''}\n"
    return f"{RULES_HEADER}\n{extra}[{body}]\n"


def parse_rules(text: str) -> list[dict]:
    """Inverse of :func:`format_rules` (drops the ``#`` lines)."""
    return json.loads("\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))


def render(alloc: SourcedPlan | Plan | str | Path, fmt: str = "table", damage_from: DamageSource | None = None
           ) -> str:
    """One of :data:`FORMATS`; ``damage_from`` adds the prediction (not to ``rules``, a list of rules only)."""
    fns = {"table": format_table, "json": format_json, "md": format_markdown}
    if fmt == "rules":
        if damage_from is not None:
            raise NasqError("--damage-from adds a prediction to the table, md and json formats; the rules format is "
                            "a list of rules only")
        return format_rules(alloc)
    if fmt not in fns:
        raise NasqError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fns[fmt](alloc, damage_from)


# ------------------------------------------------------------------------------------------------ compare


def bits_agreement(ta: Sequence[PlanTensor], tb: Sequence[PlanTensor]) -> dict:
    r"""How alike two allocations of the same tensors are, weighted by weight count.

    Over the pairs ``(ta[i], tb[i])`` with the same group layout: ``same_bits`` = share of weights whose bits are
    equal in both; ``chance`` = :math:`\sum_b p_A(b)\,p_B(b)`, the share two allocations with the same bit
    marginals :math:`p_A, p_B` (weight shares per width) would agree on if drawn independently; ``weights`` =
    the number of weights compared. ``same_bits`` near ``chance`` means the plans are unrelated.
    """
    same, n = 0, 0
    pa: dict[int, int] = {}
    pb: dict[int, int] = {}
    for x, y in zip(ta, tb, strict=True):
        if x.group_sizes != y.group_sizes:
            continue
        for rows, p, q in zip(x.group_sizes, x.bits, y.bits, strict=True):
            w = rows * x.cols
            n += w
            same += w * (p == q)
            pa[p] = pa.get(p, 0) + w
            pb[q] = pb.get(q, 0) + w
    if n == 0:
        return {"weights": 0, "same_bits": None, "chance": None}
    return {"weights": n, "same_bits": same / n, "chance": sum(v * pb.get(k, 0) for k, v in pa.items()) / n**2}


def compare_plans(a: SourcedPlan | Plan | str | Path, b: SourcedPlan | Plan | str | Path,
                  damage_from: DamageSource | None = None) -> dict:
    """Tensors whose bits differ (groups, avg bits, bytes A vs B), tensors only in one plan, totals, the
    weight-weighted :func:`bits_agreement` over the common tensors, and with ``damage_from`` each plan's
    :func:`~nasq.contract.damage.plan_prediction` (``prediction``: ``{"a", "b"}``)."""
    A, B = as_sourced_plan(a), as_sourced_plan(b)
    ta = {t.path: t for t in A.plan.tensors}
    tb = {t.path: t for t in B.plan.tensors}
    common = sorted(set(ta) & set(tb), key=_sort_key)
    diffs = []
    for path in common:
        x, y = ta[path], tb[path]
        if x.bits == y.bits and x.group_sizes == y.group_sizes:
            continue
        same_layout = x.group_sizes == y.group_sizes
        groups = [g for g, (p, q) in enumerate(zip(x.bits, y.bits, strict=True)) if p != q] if same_layout else None
        diffs.append({
            "path": path, "same_groups": same_layout, "groups": groups,
            "bits_a": [x.bits[g] for g in groups] if groups is not None else list(x.bits),
            "bits_b": [y.bits[g] for g in groups] if groups is not None else list(y.bits),
            "avg_bits_a": sum(r * q for r, q in zip(x.group_sizes, x.bits)) / x.rows,
            "avg_bits_b": sum(r * q for r, q in zip(y.group_sizes, y.bits)) / y.rows,
            "bytes_a": x.bytes, "bytes_b": y.bytes,
        })
    keys = ("searched_bytes", "encoder_linear_bytes", "fixed_bytes", "artifact_tensor_bytes", "avg_bits",
            "pruned_fraction", "budget_bytes")
    out = {"a": A.source, "b": B.source, "differ": diffs,
           "only_a": sorted(set(ta) - set(tb), key=_sort_key), "only_b": sorted(set(tb) - set(ta), key=_sort_key),
           "identical": len(common) - len(diffs),
           "agreement": bits_agreement([ta[p] for p in common], [tb[p] for p in common]),
           "totals": {k: {"a": A.plan.totals.get(k), "b": B.plan.totals.get(k)} for k in keys}}
    if damage_from is not None:
        out["prediction"] = {"a": plan_prediction(A.plan, damage_from), "b": plan_prediction(B.plan, damage_from)}
    return out


def _short(xs: Sequence[int], n: int = 12) -> str:
    return ",".join(map(str, xs[:n])) + (f",... ({len(xs)})" if len(xs) > n else "")


def format_compare(cmp: dict) -> str:
    """Plain text of :func:`compare_plans`."""
    out = [f"A: {cmp['a']}", f"B: {cmp['b']}", ""]
    if not cmp["differ"]:
        out.append(f"no differing tensors ({cmp['identical']} identical)")
    for d in cmp["differ"]:
        if d["same_groups"]:
            what = (f"{len(d['groups'])} groups differ: g[{_short(d['groups'])}] "
                    f"A[{_short(d['bits_a'])}] -> B[{_short(d['bits_b'])}]")
        else:
            what = "different group layout"
        out.append(f"{d['path']}: {what}; avg bits {d['avg_bits_a']:.2f} -> {d['avg_bits_b']:.2f}; "
                   f"bytes {d['bytes_a']:,} -> {d['bytes_b']:,} ({d['bytes_b'] - d['bytes_a']:+,})")
    for k in ("only_a", "only_b"):
        if cmp[k]:
            out.append(f"only in {k[-1].upper()}: {', '.join(cmp[k])}")
    out += ["", f"{len(cmp['differ'])} tensors differ, {cmp['identical']} identical"]
    ag = cmp["agreement"]
    if ag["weights"]:
        out.append(f"same bits on {ag['same_bits']:.1%} of {ag['weights']:,} weights "
                   f"(independent plans with these bit shares: {ag['chance']:.1%})")
    out.append("totals (A -> B):")
    for k, v in cmp["totals"].items():
        a, b = v["a"], v["b"]
        fa = "?" if a is None else (f"{a:.4f}" if isinstance(a, float) else f"{a:,}")
        fb = "?" if b is None else (f"{b:.4f}" if isinstance(b, float) else f"{b:,}")
        out.append(f"  {k}: {fa} -> {fb}")
    if pred := cmp.get("prediction"):
        for k in ("a", "b"):
            out += [f"{k.upper()}: {line}" if i == 0 else line for i, line in enumerate(prediction_lines(pred[k]))]
        a, b = pred["a"]["plan_kl_x1000"], pred["b"]["plan_kl_x1000"]
        out.append(f"predicted output KL B - A: {b - a:+.2f} x1000 nats ({'B' if b < a else 'A'} is predicted to "
                   "damage the output less before QAT)" if a != b else "predicted output KL: equal")
    return "\n".join(out) + "\n"
