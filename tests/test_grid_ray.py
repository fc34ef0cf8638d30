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
    # the same cells without Ray: the same plan and the same dev metrics (same seeds, same programs, one process
    # per stage either way)
    plain = tmp / "runs_plain"
    _grid("--config", str(cfg), "--runs", str(plain), "--results", str(tmp / "results_plain"), "--no-plot",
          "--only", "method=fp32|uniform", cache=tmp / "jax_cache")
    a, b = cell / "uniform", plain / "sst2" / "avg2" / "uniform"
    assert json.loads((a / "plan.json").read_text())["tensors"] == json.loads((b / "plan.json").read_text())["tensors"]
    ev_ray, ev_plain = (json.loads((c / "eval.json").read_text()) for c in (a, b))
    for key in ("fake_quant", "int_artifact"):
        assert ev_ray[key] == pytest.approx(ev_plain[key], abs=1e-6), key
