"""`nasq profile`: latency table from the int kernel, and a `--latency-ms` search that honours it."""

from __future__ import annotations

import json

import pytest

import nasq.cli
from nasq.contract.cost import load_latency_table

SEARCH_ARGS = ["--task", "sst2", "--train-subset", "120", "--space", "tiny", "--max-steps", "6",
               "--set", "train.batch_size=16", "--set", "model.max_len=32", "--set", "data.buckets=[32]",
               "--set", "train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def lat(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "lat.json"
    rc = nasq.cli.main(["profile", "--model", str(tiny_model_dir), "--out", str(out), "--tokens", "32",
                        "--seq-len", "16", "--repeats", "3", "--space", "tiny"])
    assert rc == 0
    return out


def _tensors(tiny_model_dir):
    from nasq.contract.space import load_space, resolve
    from nasq.models.loading import load_pretrained
    from nasq.models.surgery import linear_shapes

    model, _, _ = load_pretrained(tiny_model_dir, 2)
    return resolve(load_space("tiny"), linear_shapes(model.bert), model.config.num_attention_heads)


def test_table_format(lat, tiny_model_dir):
    t = load_latency_table(lat)
    assert t.tokens == 32 and t.fixed_ms >= 0
    # tiny BERT: encoder linears have cols 32 (q/k/v/o, intermediate) and 64 (output.dense); tiny space bits
    assert set(t.ms_per_row) == {(c, b) for c in (32, 64) for b in (2, 4, 8)}
    assert all(v > 0 for v in t.ms_per_row.values())
    assert t.meta["rows"] == {"32": 32, "64": 32}
    assert (t.meta["batch"], t.meta["seq_len"]) == (2, 16)  # --tokens 32 --seq-len 16
    from nasq.kernels import native

    # the table says which integer linear it timed: the one artifacts run here
    assert t.meta["kernel"].startswith("resident panels" if native.resolve_kernel() == "native" else
                                       "packed_linear_apply")
    t.check(_tensors(tiny_model_dir))  # every (cols, bits) the tiny search needs is there
    assert t.meta["attention"] == native.resolve_kernel()  # the attention core in fixed_ms
    # the machine's load before and after the profile is recorded (a busy machine's table is not a latency model)
    assert set(t.meta["load_avg_1min"]) == {"before", "after"} and t.meta["cpus"] >= 1


def test_busy_machine_is_warned():
    """A profile started beside other work says so (the table it writes is not a latency model)."""
    from nasq.profile import BUSY_LOAD, busy_warning

    assert busy_warning(0.0, 2) is None and busy_warning(BUSY_LOAD - 0.01, 2) is None
    w = busy_warning(2.3, 2)
    assert w.startswith("warning: load average 2.30 on 2 CPU(s)") and "idle machine" in w


def test_fixed_is_calibrated_on_the_integer_model(tiny_model_dir, monkeypatch):
    """fixed_ms = the calibration model's integer forward minus what the table says its linears take, so the
    table predicts that model's latency exactly; the calibration width is the profiled width nearest 4."""
    from nasq import profile
    from nasq.contract.cost import plan_latency_ms

    assert profile.calibration_bits([1, 2, 3, 4, 5, 6, 7, 8]) == 4
    assert profile.calibration_bits([2, 8]) == 2 and profile.calibration_bits([3, 5]) == 5
    seen = {}

    def fake_forward(model, model_dir, shapes, bits, batch, seq, repeats):
        seen.update(bits=bits, batch=batch, seq=seq)
        return 1e3

    monkeypatch.setattr(profile, "integer_forward_ms", fake_forward)
    t = profile.profile_latency(tiny_model_dir, tokens=16, seq_len=8, bits=[2, 4, 8], repeats=1)
    assert seen == {"bits": 4, "batch": 2, "seq": 8} and t.meta["calibration_bits"] == 4
    tensors = _tensors(tiny_model_dir)  # the tiny space: every encoder linear, its groups at one width here
    assert plan_latency_ms(tensors, [(4,) * x.num_groups for x in tensors], t) == pytest.approx(1e3)


def test_integer_forward_runs_the_calibration_artifact(tiny_model_dir):
    from nasq import profile
    from nasq.models.loading import load_pretrained

    model, _, report = load_pretrained(tiny_model_dir, 2)
    assert profile.integer_forward_ms(model, report.model_dir, profile.encoder_linear_shapes(model), 3, 2, 8, 1) > 0


def test_kernel_ms_is_the_marginal_cost_of_a_call(monkeypatch):
    """(T(4 chained calls) - T(1 call)) / 3 in ms (time_interleaved gives seconds): one jitted call's dispatch is
    not in the entry; a negative difference of medians is clamped just above 0."""
    from nasq import profile

    timed = {}

    def fake(fns, repeats):
        timed.update({k: f() for k, f in fns.items()})  # both programs run (and compile)
        return {1: 0.010, 4: 0.019}

    monkeypatch.setattr(profile, "time_interleaved", fake)
    assert profile.kernel_ms(8, 16, 32, 4, 1) == pytest.approx(3.0)
    assert set(timed) == {1, 4} and timed[4].shape == (8, 32)
    monkeypatch.setattr(profile, "time_interleaved", lambda fns, repeats: {1: 0.010, 4: 0.009})
    assert 0 < profile.kernel_ms(8, 16, 32, 4, 1) < 1e-6


def test_profile_function_defaults(tiny_model_dir):
    from nasq.profile import profile_latency

    t = profile_latency(tiny_model_dir, tokens=8, repeats=1, measure_fixed=False)
    assert t.fixed_ms == 0.0
    assert {b for _, b in t.ms_per_row} == set(range(1, 9))


def test_profile_refuses_overwrite_and_bad_args(lat, tiny_model_dir, capsys):
    before = lat.read_bytes()
    assert nasq.cli.main(["profile", "--model", str(tiny_model_dir), "--out", str(lat)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert lat.read_bytes() == before
    out = lat.parent / "x.json"
    assert nasq.cli.main(["profile", "--model", str(tiny_model_dir), "--out", str(out), "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err and not out.exists()
    for tokens, bad, msg in (("64", "48", "whole number of sequences"), ("64", "0", "--seq-len must be >= 1"),
                             ("4096", "4096", "positions")):
        rc = nasq.cli.main(["profile", "--model", str(tiny_model_dir), "--out", str(out), "--tokens", tokens,
                            "--seq-len", bad])
        assert rc == 2 and msg in capsys.readouterr().err and not out.exists()


def test_workload_shape():
    from nasq.errors import NasqError
    from nasq.profile import workload_shape

    assert workload_shape(4096, 128, 512) == (32, 128)
    assert workload_shape(128, None, 512) == (1, 128)
    assert workload_shape(1024, None, 512) == (2, 512)  # more tokens than positions: whole sequences
    for args, msg in (((100, 64, 512), "multiple"), ((1024, 1024, 512), "512 positions"),
                      ((600, None, 512), "give --seq-len"), ((64, 0, None), ">= 1"), ((64, 48, None), "multiple")):
        with pytest.raises(NasqError, match=msg):
            workload_shape(*args)
    assert workload_shape(4096, 1024, None) == (4, 1024)  # before the model is read: no upper bound yet


@pytest.mark.slow
def test_latency_budget_search(lat, tiny_model_dir, glue_dir, tmp_path, capsys):
    from nasq.contract.cost import latency_range

    table = load_latency_table(lat)
    lo, hi = latency_range(_tensors(tiny_model_dir), table)
    x = lo + 0.4 * (hi - lo)
    run = tmp_path / "run"
    rc = nasq.cli.main(["search", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), *SEARCH_ARGS,
                        "--latency-ms", repr(x), "--set", f"search.latency_table={lat}", "--out", str(run)])
    assert rc == 0, capsys.readouterr().err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["cost_kind"] == "latency"
    # run.json's expected_cost is E[latency of the searched linears]; the budget for them is x - fixed_ms
    assert info["cost_budget"] == pytest.approx(x - table.fixed_ms)
    assert info["expected_cost"] + table.fixed_ms <= x * (1 + 1e-6)
    res = json.loads((run / "search_result.json").read_text())
    assert res["cost_kind"] == "latency" and res["latency"]["fixed_ms"] == table.fixed_ms
    # finalize keeps the plan within the latency budget (not only in expectation), under the same table
    from nasq.contract.cost import plan_latency_ms
    from nasq.contract.plan import Plan
    from nasq.contract.search_result import SearchResult

    assert nasq.cli.main(["finalize", str(run), "--out", str(tmp_path / "plan.json")]) == 0
    plan = Plan.load(tmp_path / "plan.json")
    searched = SearchResult.load(run)[0].tensors
    assert plan_latency_ms(searched, plan.bits_per_group(), table) <= x
    assert plan.provenance["latency_budget_ms"] == pytest.approx(x)


def test_infeasible_latency_budget(lat, tiny_model_dir, glue_dir, tmp_path, capsys):
    from nasq.contract.cost import latency_range

    lo, hi = latency_range(_tensors(tiny_model_dir), load_latency_table(lat))
    run = tmp_path / "run"
    for bad in [hi * 2] + ([lo * 0.5] if lo > 0 else []):
        rc = nasq.cli.main(["search", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), *SEARCH_ARGS,
                            "--latency-ms", repr(bad), "--set", f"search.latency_table={lat}", "--out", str(run)])
        err = capsys.readouterr().err
        assert rc == 2
        assert "infeasible" in err and f"{lo:.3f}..{hi:.3f} ms" in err
        assert not run.exists()


def test_latency_without_table(tiny_model_dir, glue_dir, tmp_path, capsys):
    rc = nasq.cli.main(["search", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), *SEARCH_ARGS,
                        "--latency-ms", "1", "--out", str(tmp_path / "run")])
    assert rc == 2 and "nasq profile" in capsys.readouterr().err
