"""experiments/grid.py on an embedded local Ray (the `sweep` extra): the tiny grid of tests/grid_support.py."""

import json

import pytest
from grid_support import _grid, _rows


@pytest.mark.slow
def test_grid_on_ray(grid_config):
    """The same grid on an embedded local Ray: every stage a Ray task (1 CPU each here), the same outputs and
    results as without Ray; a second run finds everything done."""
    pytest.importorskip("ray")
    tmp, cfg = grid_config
    runs, results = tmp / "runs_ray", tmp / "results_ray"
    common = ["--config", str(cfg), "--runs", str(runs), "--results", str(results), "--no-plot", "--ray",
              "--cpus-per-stage", "1", "--only", "method=fp32|uniform"]
    r = _grid(*common, cache=tmp / "jax_cache")
    assert "ray" in r.stdout and "0 failed" in r.stdout
    cell = runs / "sst2" / "avg2"
    ev = json.loads((cell / "uniform" / "eval.json").read_text())
    assert {"fake_quant", "int_artifact", "prediction_agreement"} <= set(ev)
    timing = json.loads((cell / "uniform" / "timing.json").read_text())
    assert set(timing) == {"plan", "qat", "export", "eval"} and all(t["rc"] == 0 for t in timing.values())
    assert _rows(results / "results.csv")[("sst2", "avg2", "uniform")]["status"] == "done"
    r = _grid(*common, cache=tmp / "jax_cache")
    assert "end: 0 command(s) run, 0 failed" in r.stdout
