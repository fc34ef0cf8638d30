#!/usr/bin/env python
"""How much of a task's dev text falls into *pruned* word-embedding rows of a plan (those tokens embed to zero).

Usage (repo root):  python experiments/vocab_coverage.py --task sst2 [--data-dir ../shared/data/glue]
                        [--search-run RUN] PLAN.json...

Per plan: share of vocabulary rows pruned, share of dev tokens (special tokens included) in pruned rows, share of
dev examples with at least one such token, and the mean bits of the embedding rows the dev tokens use.
With ``--search-run`` (a `nasq search` run dir): the same train / held-out rows that search used are tokenized
and the share of pruned rows (and of all rows) whose token occurs in them is reported: a row whose token never
occurs gets no task gradient, only the budget price. Plans without a searched word embedding are reported as such.
Bad input (a missing or invalid plan, an unknown task) exits with status 2 and a one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nasq.contract.plan import Plan
from nasq.errors import NasqError

WORD_EMBEDDINGS = "embeddings.word_embeddings"


def coverage(plan: Plan, dev_ids: Sequence[np.ndarray], seen: np.ndarray | None = None) -> dict:
    """Pruned-row statistics of ``plan``'s word embeddings over tokenized dev examples ``dev_ids``.

    ``row_bits[v]`` = bits of vocabulary row ``v``; a row is pruned when ``row_bits[v] == 0``. Token shares are
    over all dev tokens (concatenated); ``seen`` (bool per vocabulary row) marks rows whose token the search saw.
    """
    if WORD_EMBEDDINGS not in plan.paths:
        return {"plan": plan.source, "word_embeddings": "not searched"}
    e = plan.tensor(WORD_EMBEDDINGS)
    row_bits = np.repeat(np.asarray(e.bits), e.group_sizes)
    pruned = row_bits == 0
    toks = np.concatenate(dev_ids)
    if toks.size and toks.max() >= e.rows:
        raise NasqError(f"{plan.source}: dev token id {int(toks.max())} >= the plan's {e.rows} vocabulary rows; "
                        "was the plan made for another model (--model)?")
    out = {
        "plan": plan.source, "method": plan.provenance.get("method"), "choices": list(e.choices),
        "pruned_vocab_rows": round(float(pruned.mean()), 4),
        "dev_tokens_in_pruned_rows": round(float(pruned[toks].mean()), 4),
        "dev_examples_with_a_pruned_token": round(float(np.mean([pruned[x].any() for x in dev_ids])), 4),
        "mean_bits_of_dev_tokens": round(float(row_bits[toks].mean()), 3),
    }
    if seen is not None:
        out["search_rows_seen_of_all_rows"] = round(float(seen.mean()), 4)
        out["search_rows_seen_of_pruned_rows"] = round(float(seen[pruned].mean()), 4) if pruned.any() else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plans", nargs="+")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default="../shared/data/glue")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--search-run", help="nasq search run dir whose train + held-out rows count as seen")
    a = p.parse_args(argv)
    try:
        plans = [Plan.load(path) for path in a.plans]  # validate every plan before the (slow) tokenization
        for out in run(a, plans):
            print(json.dumps(out))
    except NasqError as e:
        print(f"vocab_coverage: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(a: argparse.Namespace, plans: list[Plan]):
    from nasq.data.glue import get_task, load_split
    from nasq.models.loading import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(a.model)
    seen = None
    if a.search_run:
        from nasq.config import load_config
        from nasq.data.tasks import load_task_data

        cfg_path = Path(a.search_run) / "config.yaml"
        if not cfg_path.is_file():
            raise NasqError(f"--search-run {a.search_run}: no config.yaml; pass a `nasq search` run directory")
        data = load_task_data(load_config(cfg_path), with_heldout=True)
        seen = np.zeros(int(json.loads((model_dir / "config.json").read_text())["vocab_size"]), bool)
        for enc in (data.train, data.heldout):
            for ids in enc.input_ids:
                seen[ids] = True
    tok = load_tokenizer(model_dir)
    ds = load_split(get_task(a.task), "dev", a.data_dir)
    cols = [c for c in ("text_a", "text_b") if c in ds.column_names]
    dev = [np.asarray(tok(*[ds[c][i] for c in cols])["input_ids"]) for i in range(len(ds))]
    for plan in plans:
        yield coverage(plan, dev, seen)


if __name__ == "__main__":
    sys.exit(main())
