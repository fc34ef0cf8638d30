#!/usr/bin/env python
"""How much of a task's dev text falls into *pruned* word-embedding rows of a plan (those tokens embed to zero).

Usage (repo root):  python experiments/vocab_coverage.py --task sst2 [--data-dir ../shared/data/glue]
                        [--search-run RUN] PLAN.json...

Per plan: share of vocabulary rows pruned, share of dev tokens (special tokens included) in pruned rows, share of
dev examples with at least one such token, and the mean bits of the embedding rows the dev tokens use.
With ``--search-run`` (a `nasq search` run dir): the same train / held-out rows that search used are tokenized
and the share of pruned rows (and of all rows) whose token occurs in them is reported: a row whose token never
occurs gets no task gradient, only the budget price. Plans without a searched word embedding are reported as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nasq.data.glue import get_task, load_split
from nasq.models.loading import load_tokenizer, resolve_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plans", nargs="+")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default="../shared/data/glue")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--search-run", help="nasq search run dir whose train + held-out rows count as seen")
    a = p.parse_args()
    seen = None
    if a.search_run:
        from nasq.config import load_config
        from nasq.train.common import load_task_data

        data = load_task_data(load_config(f"{a.search_run}/config.yaml"), with_heldout=True)
        seen = np.zeros(tok_vocab_size(a.model), bool)
        for enc in (data.train, data.heldout):
            for ids in enc.input_ids:
                seen[ids] = True
    tok = load_tokenizer(resolve_model_dir(a.model))
    ds = load_split(get_task(a.task), "dev", a.data_dir)
    cols = [c for c in ("text_a", "text_b") if c in ds.column_names]
    dev = [np.asarray(tok(*[ds[c][i] for c in cols])["input_ids"]) for i in range(len(ds))]
    toks = np.concatenate(dev)
    for path in a.plans:
        plan = json.loads(Path(path).read_text())
        emb = [t for t in plan["tensors"] if t["path"] == "embeddings.word_embeddings"]
        if not emb:
            print(json.dumps({"plan": path, "word_embeddings": "not searched"}))
            continue
        e = emb[0]
        row_bits = np.repeat(np.asarray(e["bits"]), e["group_sizes"])
        pruned = row_bits == 0
        print(json.dumps({
            "plan": path, "method": plan["provenance"].get("method"), "choices": e["choices"],
            "pruned_vocab_rows": round(float(pruned.mean()), 4),
            "dev_tokens_in_pruned_rows": round(float(pruned[toks].mean()), 4),
            "dev_examples_with_a_pruned_token": round(float(np.mean([pruned[x].any() for x in dev])), 4),
            "mean_bits_of_dev_tokens": round(float(row_bits[toks].mean()), 3),
            **({} if seen is None else {
                "search_rows_seen_of_all_rows": round(float(seen.mean()), 4),
                "search_rows_seen_of_pruned_rows": round(float(seen[pruned].mean()), 4) if pruned.any() else None,
            }),
        }))


def tok_vocab_size(model: str) -> int:
    return int(json.loads((resolve_model_dir(model) / "config.json").read_text())["vocab_size"])


if __name__ == "__main__":
    main()
