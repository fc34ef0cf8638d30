"""nasq from Python, end to end, with the public API (``import nasq``; ``nasq/api.py``):

    fp32 teacher -> search under a size budget -> finalize (its own budget and a second one, from one search)
    (and the measured allocation at the same budget, one of `nasq pipeline`'s two sensitivity allocators, for comparison) -> QAT + KD of the plan, from the search's weights -> bit-packed integer artifact -> predict / evaluate
    -> ONNX (when the ``onnx`` extra is installed)

Run from the repo root (a smoke-sized recipe by default: a few minutes on 2 CPU cores; its accuracy means
nothing, raise ``--steps`` / ``--train-subset`` for a real run):

    python notebooks/quickstart.py --data-dir ../shared/data/glue --out runs/quickstart

Every stage writes a run directory under ``--out``; rerunning with ``--resume`` continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nasq
from nasq.errors import NasqError


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data/glue", help="local GLUE directory")
    ap.add_argument("--out", default="runs/quickstart", help="directory for every stage's output")
    ap.add_argument("--model", default="minilm-l6", help="alias, local model directory or hub id")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=24, help="training steps of each stage")
    ap.add_argument("--train-subset", type=int, default=512)
    ap.add_argument("--avg-bits", type=float, default=2.0, help="the search's budget")
    ap.add_argument("--space", default="aqbert_128g", help="search space (search_spaces/)")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    mode = {"resume": a.resume, "overwrite": not a.resume}

    common = {"data.train_subset": a.train_subset, "train.max_steps": a.steps, "model.max_len": a.max_len}
    cfg = nasq.make_config(task=a.task, model=a.model, data_dir=a.data_dir, **common)
    teacher = nasq.finetune(cfg, out / "teacher", **mode)  # fp32 fine-tune: the KD teacher

    cfg = nasq.make_config(task=a.task, model=a.model, data_dir=a.data_dir, teacher=str(teacher),
                           **common, **{"search.avg_bits": a.avg_bits, "search.space": a.space})
    search = nasq.run_search(cfg, out / "search", **mode)

    plan = nasq.finalize(search, out / "plan.json", spend_leftover=True, overwrite=True)
    wider = nasq.finalize(search, out / "plan_wider.json", avg_bits=a.avg_bits + 1, overwrite=True)
    # the measured allocation (no search: each tensor's output KL at every width, then the knapsack)
    measured = nasq.allocate(cfg, out / "plan_measured.json", method="measured", n_batches=2, overwrite=True)
    for p in (plan, wider, measured):
        t = p.totals
        print(f"plan: {t['searched_bytes']:,} of {p.budget['bytes']:,} budget bytes, avg {t['avg_bits']:.2f} bits, "
              f"{100 * t['pruned_fraction']:.0f}% of the rows pruned")
    print(nasq.inspect(out / "plan.json").plan.totals["avg_bits"], "average bits (nasq.inspect)")

    qat = nasq.finetune(cfg, out / "qat", plan=out / "plan.json", init_from=search, **mode)
    artifact = nasq.export_artifact(qat, out / "model.nasq", overwrite=True)
    model = nasq.load(artifact)
    print(json.dumps(model.predict(["a gripping, funny film", "a dull, lifeless mess"])))
    metrics = model.evaluate(nasq.make_config(data_dir=a.data_dir, **{"model.max_len": a.max_len}))
    print("dev through the integer path:", json.dumps(metrics))
    result = {"artifact": str(artifact), "search": str(search), "plan": plan, "wider": wider, "measured": measured,
              "dev": metrics,
              "predictions": model.predict(["a gripping, funny film", "dull"])}
    try:
        result["onnx"] = nasq.export_onnx(artifact, out / "model.onnx", overwrite=True)
        print(f"ONNX: {result['onnx']['onnx_file_bytes']:,} bytes")
    except NasqError as e:  # the onnx extra is not installed
        print(f"ONNX skipped: {e}")
    return result


if __name__ == "__main__":
    main()
