"""The model card (``README.md``) every artifact carries: what was kept at how many bits, the budget, the bytes,
the dev metrics, and how it was made. Written by the exporter from the plan, the manifest's byte accounting and
the source run's ``run.json``; it is one of the manifest's checksummed files, never read back by nasq."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from nasq.contract.plan import Plan

__all__ = ["model_card"]


def _metrics(m: dict | None) -> str:
    if not m:
        return ""
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "wall_s")


def bits_by_rule(plan: Plan) -> list[dict[str, Any]]:
    """Per search-space rule: tensors, weights, weight-weighted average bits, pruned share, share per width."""
    acc: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "weights": 0, "bits": 0.0, "by_width": defaultdict(int)})
    for t in plan.tensors:
        a = acc[t.rule or t.kind]
        a["tensors"] += 1
        for rows, b in zip(t.group_sizes, t.bits, strict=True):
            n = rows * t.cols
            a["weights"] += n
            a["bits"] += n * b
            a["by_width"][int(b)] += n
    out = []
    for rule, a in acc.items():
        w = max(a["weights"], 1)
        out.append({"rule": rule, "tensors": a["tensors"], "weights": a["weights"], "avg_bits": a["bits"] / w,
                    "pruned": a["by_width"].get(0, 0) / w,
                    "share": {b: n / w for b, n in sorted(a["by_width"].items())}})
    return out


def model_card(plan: Plan, manifest: dict, *, source: str, run_info: dict | None,
               int_metrics: dict | None = None) -> str:
    """Markdown text of the card (see module docstring). ``run_info``: the source run's ``run.json``;
    ``int_metrics``: the dev metrics measured through this artifact's integer path (``evaluate_artifact``)."""
    t = plan.totals
    run_info = run_info or {}
    b = plan.budget
    budget = (f"{b.get('source')} = {b.get('bytes'):,} bytes ({b.get('convention')} convention)" if b else
              "none (the plan was made without a budget)")
    lines = [
        f"# nasq integer model: {manifest.get('task') or 'classifier'} ({plan.provenance.get('model', '')})",
        "",
        (f"A BERT classifier with bit-packed integer weights, exported by nasq {manifest.get('nasq_version')} "
         f"(artifact format {manifest.get('version')}) on {manifest.get('created')}. Load it with "
         "`nasq.load(DIR)` or `nasq predict --artifact DIR`; the files and their checksums are in manifest.json."),
        "",
        "## Size",
        "",
        "| | value |",
        "|---|---|",
        f"| budget | {budget} |",
        (f"| searched tensors | {t.get('searched_bytes'):,} bytes, average {t.get('avg_bits'):.3f} bits per weight, "
        f"{100 * t.get('pruned_fraction', 0):.1f}% of the weights pruned |"),
        (f"| all tensors of this artifact | {manifest.get('tensor_bytes'):,} bytes (cost model: "
        f"{manifest.get('predicted_bytes'):,}) |"),
        f"| the same tensors in fp32 | {t.get('fp32_searched_bytes', 0):,} bytes searched |",
        "",
        "## Bits per module kind (share of the weights at each width; 0 = pruned)",
        "",
        "| rule | tensors | weights | avg bits | pruned | widths |",
        "|---|---|---|---|---|---|",
    ]
    for r in bits_by_rule(plan):
        widths = ", ".join(f"{b}: {100 * s:.1f}%" for b, s in r["share"].items())
        lines.append(f"| {r['rule']} | {r['tensors']} | {r['weights']:,} | {r['avg_bits']:.3f} | "
                     f"{100 * r['pruned']:.1f}% | {widths} |")
    dev = _metrics(run_info.get("dev"))
    prov = plan.provenance
    lines += [
        "",
        "## Dev metrics",
        "",
        (f"- fake-quant model of the QAT run (its final dev evaluation): {dev}" if dev else
         "- the QAT run recorded no dev evaluation"),
        (f"- through this integer artifact ({int_metrics.get('task')} dev, {int_metrics.get('dev_rows')} rows, "
         f"kernel {int_metrics.get('kernel')}): {_metrics(int_metrics)}" if int_metrics else
         "- through this integer artifact: not measured at export (`nasq export --eval` measures them; `nasq eval "
         "RUN --artifact DIR` also the prediction agreement with the fake-quant model)"),
        "",
        "## How it was made",
        "",
        (f"- plan: method `{prov.get('method')}`, space `{prov.get('space_name') or plan.space.get('name', '')}`, "
        f"from `{prov.get('run')}`, nasq git revision `{prov.get('git_rev')}`"),
        f"- quantization-aware fine-tune: `{source}` ({run_info.get('total_steps', '?')} steps on "
        f"{run_info.get('train_rows', '?')} training rows)"
        + (f": `{run_info['command']}`" if run_info.get("command") else ""),
        "- exported with `nasq export RUN --out DIR`",
    ]
    return "\n".join(lines) + "\n"
