"""Does the early QAT curve tell which Fisher granularity will win? (issue 16: a proxy of recovery under QAT)

For every row of a grid where Fisher per weight (``fisher_w``) and per tensor (``fisher_t``) both finished 3
seeds, the difference of their mean dev metrics at each QAT checkpoint (results.csv's ``dev_curve``:
fake-quantized weights, the grid's ``eval_every``), and at how many rows its sign matches the sign of the
final difference (the metric through the integer artifact)::

    python experiments/granularity_curves.py experiments/results/protocol/results.csv \
        > experiments/results/protocol/granularity_curves.json

If a short QAT (a quarter or half of the grid's) already ranked the two plans as the full one does, an
allocator could race both granularities cheaply and keep the winner.
"""

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curve_jitter import parse_curve  # experiments/curve_jitter.py: "100:0.8 200:0.9" -> {100: 0.8, 200: 0.9}


def race(rows: list[dict], seeds: int = 3) -> dict:
    """``rows``: a grid's results.csv rows. Returns ``{"sign_matches_final": {step: "h of n rows"},
    "rows": {"task budget": {"final_w_minus_t", "dev_w_minus_t_at_step"}}}`` over the rows where both
    granularities have at least ``seeds`` finished runs; the steps are those every such run evaluated."""
    cells: dict[tuple[str, str], dict[str, list]] = {}
    for row in rows:
        if row["method"] in ("fisher_w", "fisher_t") and row["dev_curve"] and row["metric"]:
            cells.setdefault((row["task"], row["budget"]), {}).setdefault(row["method"], []).append(
                (parse_curve(row["dev_curve"]), float(row["metric"])))
    per_row, hits = {}, {}
    for (task, budget), runs in sorted(cells.items()):
        if min(len(runs.get("fisher_w", [])), len(runs.get("fisher_t", []))) < seeds:
            continue
        final = (statistics.mean(m for _, m in runs["fisher_w"])
                 - statistics.mean(m for _, m in runs["fisher_t"]))
        steps = sorted(set.intersection(*(set(c) for method in runs.values() for c, _ in method)))
        diffs = {s: statistics.mean(c[s] for c, _ in runs["fisher_w"])
                 - statistics.mean(c[s] for c, _ in runs["fisher_t"]) for s in steps}
        for s, d in diffs.items():
            hits.setdefault(s, [0, 0])
            hits[s][0] += (d > 0) == (final > 0)
            hits[s][1] += 1
        per_row[f"{task} {budget}"] = {"final_w_minus_t": round(final, 4),
                                       "dev_w_minus_t_at_step": {s: round(d, 4) for s, d in diffs.items()}}
    return {"sign_matches_final": {s: f"{h} of {n} rows" for s, (h, n) in sorted(hits.items())},
            "rows": per_row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_csv")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds each granularity needs at a row (default 3)")
    args = parser.parse_args(argv)
    try:
        with Path(args.results_csv).open(newline="") as handle:
            result = race(list(csv.DictReader(handle)), args.seeds)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, ValueError) as e:
        print(f"granularity_curves: error: {args.results_csv}: not a readable grid results.csv "
              f"({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    json.dump({"what": __doc__.split("::")[0].strip(), "source": args.results_csv, **result}, sys.stdout,
              indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
