"""Shared by tests/test_grid.py and tests/test_grid_ray.py: the tiny grid (tiny BERT, SST-2 cut to 64 rows, one
budget, 2-3 steps per stage) and how the tests run experiments/grid.py. Two files so that a parallel test run
(`pytest -n auto --dist loadfile`) can put the two end-to-end grid runs on different workers."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "experiments" / "grid.py"
TRAIN_COMMANDS = ("nasq finetune", "nasq search", "nasq baseline", "nasq finalize", "nasq export", "nasq eval")


def _grid_module():
    spec = importlib.util.spec_from_file_location("grid", GRID)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["grid"] = mod
    spec.loader.exec_module(mod)
    return mod


def _mini_glue(src: Path, dst: Path, rows: int = 64) -> Path:
    (dst / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = (src / "SST-2" / name).read_text().splitlines(keepends=True)
        (dst / "SST-2" / name).write_text("".join(lines[: rows + 1]))
    return dst


def _grid(*args: str, cache: Path, rc: int = 0) -> subprocess.CompletedProcess:
    # a persistent compilation cache shared by the tiny grid's ~10 nasq processes (halves the test's time)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NASQ_NO_PROGRESS": "1", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    r = subprocess.run([sys.executable, str(GRID), *args], cwd=REPO, env=env, capture_output=True, text=True,
                       check=False, timeout=900)
    assert r.returncode == rc, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def _rows(path: Path) -> dict[tuple[str, str, str], dict]:
    with path.open(newline="") as f:
        return {(r["task"], r["budget"], r["method"]): r for r in csv.DictReader(f)}


def make_grid_config(tmp_path_factory, tiny_model_dir, glue_dir):
    """(directory, grid.yaml path) of the tiny grid."""
    tmp = tmp_path_factory.mktemp("grid")
    cfg = {
        "model": str(tiny_model_dir),
        "data_dir": str(_mini_glue(glue_dir, tmp / "glue")),
        "seed": 0,
        "tasks": ["sst2"],
        "common": {"set": {"model.max_len": 32, "data.buckets": [32], "train.log_every": 1}},
        "stages": {
            "finetune": {"max_steps": 3, "train_subset": 64, "lr": 1e-3},
            "search": {"max_steps": 3, "train_subset": 64, "lr": 1e-4, "set": {"data.heldout": 0.25}},
            "qat": {"max_steps": 2, "train_subset": 64},
        },
        "budgets": {"avg2": {"avg_bits": 2, "space": "tiny", "uniform": {"bits": 2}}},
        "methods": ["fp32", "uniform", "random", "nasq"],
    }
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp, path


