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
    from nasq.profile import attention_path

    assert t.meta["attention"] == attention_path()  # the attention core fixed_ms is estimated for


def test_fixed_estimate_swaps_in_the_attention_core_that_runs(tiny_model_dir, monkeypatch):
    """Where the native kernel runs, the fixed remainder is for the native attention core (the fp32 forward's XLA
    core is subtracted, the native one added); on the XLA path nothing is swapped."""
    from nasq import profile
    from nasq.models.loading import load_pretrained

    model, _, _ = load_pretrained(tiny_model_dir, 2)
    shapes = profile.encoder_linear_shapes(model)
    calls = []

    def fake(core, shape, layers, repeats):
        calls.append((core, shape, layers))
        return 1e6 if core == "native" else 0.0

    monkeypatch.setattr(profile, "attention_ms", fake)
    monkeypatch.setattr(profile, "attention_path", lambda: "native")
    assert profile.fixed_remainder_ms(model, shapes, 8, 1) >= 1e6 - 1e3
    cfg = model.config
    assert calls == [(c, (1, 8, cfg.num_attention_heads, cfg.head_dim), cfg.num_hidden_layers)
                     for c in ("native", "xla")]
    calls.clear()
    monkeypatch.setattr(profile, "attention_path", lambda: "xla")
    assert profile.fixed_remainder_ms(model, shapes, 8, 1) < 1e5 and not calls


def test_attention_ms_times_both_cores():
    from nasq import profile

    assert profile.attention_ms("xla", (2, 8, 2, 16), 2, 1) > 0
    if profile.attention_path() == "native":
        assert profile.attention_ms("native", (2, 8, 2, 16), 2, 1) > 0


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
    for bad, msg in (("48", "whole number of sequences"), ("0", "--seq-len must be in")):
        rc = nasq.cli.main(["profile", "--model", str(tiny_model_dir), "--out", str(out), "--tokens", "64",
                            "--seq-len", bad])
        assert rc == 2 and msg in capsys.readouterr().err and not out.exists()


def test_workload_shape():
    from nasq.profile import workload_shape

    assert workload_shape(4096, 128, 512) == (32, 128)
    assert workload_shape(128, None, 512) == (1, 128)
    assert workload_shape(1024, None, 512) == (2, 512)  # more tokens than positions: whole sequences
    with pytest.raises(Exception, match="multiple"):
        workload_shape(100, 64, 512)
    with pytest.raises(Exception, match=r"\[1, 512\]"):
        workload_shape(1024, 1024, 512)


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
    assert res["cost_kind"] == "latency"


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
