#!/usr/bin/env python
"""How much of a cell's seed spread is late-QAT jitter (issue 16): from a grid's results.csv, no training.

For every (task, budget, method) with at least ``--min-seeds`` finished seeds whose QAT curves reach
``--last-step``:

    within   mean over seeds of sd(curve[s] for s in [from_step, last_step])    the jitter inside one run
    across   sd over seeds of the final fake-quant metric                      the spread the table reports

(sample sds, in metric units; ``within`` includes any trend left over the window). Where the QAT averaged its
weights (``train.ema_decay``; the grid's ``raw_dev_curve`` / ``raw_weights_metric`` columns) the same two numbers
are given for the raw weights of the same runs, so the average's effect is read off one set of runs.

    python experiments/curve_jitter.py experiments/results/protocol/results.csv [--from-step 500] [--last-step 800]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def parse_curve(text: str) -> dict[int, float]:
    """``"100:0.81 200:0.85"`` -> ``{100: 0.81, 200: 0.85}``; '' -> {}. Raises ValueError on a malformed point."""
    out = {}
    for point in (text or "").split():
        step, v = point.split(":")
        out[int(step)] = float(v)
    return out


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def jitter(rows: list[dict], from_step: int = 500, last_step: int = 800, min_seeds: int = 3) -> list[dict]:
    """One record per (task, budget, method) (see the module docstring): ``n``, ``within``, ``across`` and, where
    every run of the group logged its raw weights, ``raw_within`` and ``raw_across``. A spread needs two seeds, so
    ``min_seeds`` is at least 2."""
    min_seeds = max(min_seeds, 2)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "done":
            groups[(r["task"], r["budget"], r["method"])].append(r)
    out = []
    for (task, budget, method), rs in groups.items():
        arms = {}
        for arm, curve_col, final_col in (("", "dev_curve", "fake_quant_metric"),
                                          ("raw_", "raw_dev_curve", "raw_weights_metric")):
            within, finals = [], []
            for r in rs:
                c = parse_curve(r.get(curve_col) or "")
                window = [v for s, v in c.items() if from_step <= s <= last_step]
                final = _num(r.get(final_col))
                if last_step in c and len(window) >= 2 and final is not None:
                    within.append(statistics.stdev(window))
                    finals.append(final)
            if len(finals) >= min_seeds and len(finals) == len(rs):
                arms[arm] = (statistics.mean(within), statistics.stdev(finals), len(finals))
        if "" in arms:
            rec = {"task": task, "budget": budget, "method": method, "n": arms[""][2],
                   "within": arms[""][0], "across": arms[""][1]}
            if "raw_" in arms:
                rec |= {"raw_within": arms["raw_"][0], "raw_across": arms["raw_"][1]}
            out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a grid's results.csv")
    p.add_argument("--from-step", type=int, default=500)
    p.add_argument("--last-step", type=int, default=800)
    p.add_argument("--min-seeds", type=int, default=3)
    a = p.parse_args(argv)
    try:
        with Path(a.results).open(newline="") as f:
            rows = list(csv.DictReader(f))
        recs = jitter(rows, a.from_step, a.last_step, a.min_seeds)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, ValueError) as e:
        print(f"curve_jitter: error: {a.results}: not a readable grid results.csv ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    if not recs:
        print(f"curve_jitter: no (task, budget, method) with {a.min_seeds}+ finished seeds whose curves reach step "
              f"{a.last_step} in {a.results}")
        return 0
    raw = any("raw_within" in r for r in recs)
    print(f"| task | budget | method | n | within-run sd (steps {a.from_step}-{a.last_step}) | across-seed sd |"
          + (" raw weights: within | raw weights: across |" if raw else ""))
    print("|---" * (6 + 2 * raw) + "|")
    for r in recs:
        extra = (f" {r['raw_within']:.4f} | {r['raw_across']:.4f} |" if "raw_within" in r else " | |") if raw else ""
        print(f"| {r['task']} | {r['budget']} | {r['method']} | {r['n']} | {r['within']:.4f} | {r['across']:.4f} |"
              + extra)
    print(f"\nmean over {len(recs)}: within {statistics.mean(r['within'] for r in recs):.4f}, across "
          f"{statistics.mean(r['across'] for r in recs):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
