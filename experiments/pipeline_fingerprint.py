#!/usr/bin/env python
"""Fingerprint of a fixed-seed smoke pipeline on a tiny random BERT: did a refactor change what nasq computes?

    python experiments/pipeline_fingerprint.py --data-dir ../shared/data/glue

Runs `nasq pipeline --preset smoke --allocator search` (or `measured`, `fisher`) on a tiny random checkpoint (`nasq.testing.make_tiny_checkpoint`, seed 0;
3 steps per stage, 96 train rows, space `tiny`) in a temporary directory and prints the sha256 (16 hex digits)
of the plan's tensors, totals and budget (provenance excluded: it holds dates and paths) and of the artifact's
`tensors.safetensors` and `layout.json`, plus the dev metric through the integer path. Run it before and after
a change that should not change behaviour and compare the two outputs (results: experiments/results/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["NASQ_NO_PROGRESS"] = "1"


def main(argv: list[str] | None = None) -> int:
    from nasq.cli import main as nasq_main
    from nasq.testing import make_tiny_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="GLUE directory (standard layout)")
    ap.add_argument("--allocator", default="search", choices=("search", "measured", "fisher"),
                    help="the pipeline's allocator (default search: the fingerprints recorded before the measured "
                    "allocation became the pipeline's default, 2026-11-30, were made with it)")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nasq_fingerprint_"))
    tiny = make_tiny_checkpoint(work / "tiny")
    rc = nasq_main(["pipeline", "--preset", "smoke", "--model", str(tiny), "--data-dir", a.data_dir,
                    "--out", str(work / "pipe"), "--set", "model.max_len=32", "--set", "data.train_subset=96",
                    "--set", "data.buckets=[32]", "--set", "train.max_steps=3", "--set", "train.batch_size=16",
                    "--set", "search.space=tiny", "--allocator", a.allocator])
    if rc:
        return rc
    pipe = work / "pipe"
    plan = json.loads((pipe / "plan.json").read_text())

    def h(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()[:16]

    out = {"plan.tensors": h(json.dumps(plan["tensors"], sort_keys=True).encode()),
           "plan.totals": h(json.dumps(plan["totals"], sort_keys=True).encode()),
           "plan.budget": h(json.dumps(plan["budget"], sort_keys=True).encode()),
           "artifact.tensors": h((pipe / "model.nasq" / "tensors.safetensors").read_bytes()),
           "artifact.layout": h((pipe / "model.nasq" / "layout.json").read_bytes()),
           "int_artifact": json.loads((pipe / "summary.json").read_text())["int_artifact"]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
