"""Integer BERT pieces: resident vs fused unpacking, dropped heads, LayerNorm formula, input checks."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from nasq.errors import NasqError
from nasq.kernels.int_bert import IntBert, ResidentLinear, layer_norm, resident_linear_apply
from nasq.kernels.int_linear import pack_linear, packed_linear_apply


@pytest.mark.parametrize("bits", [(4, 0, 1, 8), (0, 0, 0, 0), (2, 3, 2, 3)])
def test_resident_linear_bit_identical(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12)).astype(np.float32) * 0.1
    b = rng.standard_normal(16).astype(np.float32)
    p = pack_linear(w, b, [4, 4, 4, 4], bits, np.array([.05, .04, .03, .002], np.float32))
    x = jnp.asarray(rng.standard_normal((2, 5, 12)).astype(np.float32))
    want = np.asarray(packed_linear_apply(x, p))
    got = np.asarray(resident_linear_apply(x, ResidentLinear.from_packed(p)))
    np.testing.assert_array_equal(got, want)
    assert got.shape == (2, 5, 16)


def test_layer_norm_matches_model():
    from nasq.models.bert import LayerNorm

    rng = np.random.default_rng(1)
    ln = LayerNorm(8, 1e-12)
    ln.scale[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    ln.bias[...] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(layer_norm(x, (ln.scale[...], ln.bias[...]), 1e-12)),
                                  np.asarray(ln(x)))


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    from test_export import build_quant_model

    from nasq.export.writer import export_model

    model, plan = build_quant_model(tiny_model_dir, seed=5)
    return export_model(model, plan, tmp_path_factory.mktemp("ib") / "m.nasq", task="sst2", num_labels=2,
                        source_dir=tiny_model_dir)


def test_dropped_heads_change_nothing(artifact):
    """Skipping heads with all-pruned value rows gives the same logits as computing every head."""
    from nasq.export.reader import load_artifact

    im = load_artifact(artifact)
    assert im.meta.active_heads[1] == (1,)
    full = IntBert(dataclasses.replace(im.meta, active_heads=((0, 1, 2, 3),) * 2), im.params)
    rng = np.random.default_rng(2)
    ids = rng.integers(1000, 30000, (3, 10)).astype(np.int32)
    am = np.ones_like(ids)
    am[0, 7:] = 0
    np.testing.assert_allclose(np.asarray(im(ids, None, am)), np.asarray(full(ids, None, am)), atol=1e-7)
    # resident codes vs packed: to the last fp32 bit (bit-identical at XLA's default optimisation level, not
    # always at the tests' -O0, conftest)
    np.testing.assert_allclose(np.asarray(load_artifact(artifact, unpack="load")(ids, None, am)),
                               np.asarray(im(ids, None, am)), rtol=1e-6, atol=0)


def test_input_checks(artifact):
    from nasq.export.reader import load_artifact

    with pytest.raises(NasqError, match="unpack"):
        load_artifact(artifact, unpack="lazy")
    im = load_artifact(artifact)
    with pytest.raises(NasqError, match="max_position_embeddings"):
        im(np.ones((1, 200), np.int32))
    with pytest.raises(NasqError, match=r"\[batch, seq\]"):
        im(np.ones((5,), np.int32))


def test_profile_scripts_time_the_real_parts(artifact, tiny_model_dir, capsys, tmp_path):
    """experiments/profile_int_forward.py: the `whole` part is the model's forward, every part runs, the records
    carry the environment; experiments/segments_bench.py compares the artifact's own linear."""
    import importlib.util
    import json
    from pathlib import Path

    from nasq.export.reader import load_artifact

    def load(name):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "experiments" /
                                                      f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    prof = load("profile_int_forward")
    model = load_artifact(artifact, unpack="fused")
    fns = prof.parts(model, 2, 8, "xla")
    assert set(fns) >= {"whole", "qkv_linears", "attention_core", "ffn_in_linear", "gelu", "dispatch"}
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 2000, (2, 8)), jnp.int32)
    np.testing.assert_allclose(np.asarray(fns["whole"]()), np.asarray(model(ids)), rtol=1e-5, atol=1e-5)
    assert all(f() is not None for f in fns.values())
    out = tmp_path / "p.jsonl"
    assert prof.main([str(artifact), "--shapes", "1x8", "--repeats", "1", "--kernel", "xla", "--out", str(out)]) == 0
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec["whole_ms"] > 0 and rec["layers"] == model.config.num_hidden_layers and "date" in rec
    assert abs(rec["whole_ms"] - sum(rec["parts_ms"].values()) - rec["rest_ms"]) < 1e-6
    assert "| **whole forward** |" in capsys.readouterr().out
    from nasq.kernels import native

    check = load("latency_model_check")  # nasq profile's prediction next to the artifact's measured forward
    assert check.main([str(artifact), "--model", str(tiny_model_dir), "--shape", "2x8", "--repeats", "1"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    (row,) = line["artifacts"]
    assert line["shape"] == "2x8" and row["predicted_ms"] > line["fixed_ms"] >= 0 and row["measured_ms"] > 0
    assert row["predicted_over_measured"] == pytest.approx(row["predicted_ms"] / row["measured_ms"], rel=1e-2)
    if native.available():
        seg = load("segments_bench")
        assert seg.main([str(artifact), "--tokens", "4", "--repeats", "1", "--module", "inter"]) == 0
        line = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert line["tokens"] == 4 and any(k.startswith("mixed") for k in line["ms"])


def test_unpack_modes_agree_and_panels_need_native(artifact):
    """Every unpack mode gives the same logits, bit for bit ("auto" is "panels" on the native kernel, else
    "fused"); resident panels under the XLA kernel are a clear error."""
    from nasq.export.reader import load_artifact
    from nasq.kernels import native

    rng = np.random.default_rng(6)
    ids = rng.integers(1000, 30000, (3, 9)).astype(np.int32)
    am = np.ones_like(ids)
    modes = ("auto", "fused", "load") + (("panels",) if native.available() else ())
    models = {m: load_artifact(artifact, unpack=m) for m in modes}
    assert models["auto"].meta.unpack == ("panels" if native.resolve_kernel() == "native" else "fused")
    ref = np.asarray(models["fused"](ids, None, am))
    for m, im in models.items():
        np.testing.assert_array_equal(np.asarray(im(ids, None, am)), ref, err_msg=m)
    if native.available():
        with pytest.raises(NasqError, match="native kernel"):
            IntBert(dataclasses.replace(models["panels"].meta, kernel="xla", unpack="panels"),
                    load_artifact(artifact, unpack="fused").params)



@pytest.mark.slow  # the whole bench command on two artifacts: about 45 s
def test_bench_infer_times_artifacts_side_by_side(artifact, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """`nasq bench infer --artifact A --artifact B`: B is timed in A's interleaved rounds and reported with its
    plan's average bits and its time relative to A on the same (default) path."""
    import json

    from test_export import build_quant_model

    from nasq.cli import main
    from nasq.contract.model_dir import save_model_dir
    from nasq.contract.plan import Plan
    from nasq.export.writer import export_model

    model, plan = build_quant_model(tiny_model_dir, seed=6)
    other = export_model(model, plan, tmp_path / "b.nasq", task="sst2", num_labels=2, source_dir=tiny_model_dir)
    run = tmp_path / "run"  # the fp32 reference: a run's model dequantized into plain fp32 linears
    save_model_dir(run / "model", model, source_model_dir=tiny_model_dir, num_labels=2, task="sst2", plan=plan)
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "infer", "--artifact", str(artifact), "--artifact", str(other), "--teacher",
                 str(run), "--batch-size", "1", "--seq-len", "8", "--repeats", "2",
                 "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec == json.loads(capsys.readouterr().out.splitlines()[-1])
    (c,) = rec["compare"]
    assert c["artifact"] == str(other) and c["ms"] > 0
    assert c["avg_bits"] == pytest.approx(Plan.load(other / "plan.json").totals["avg_bits"])
    assert rec["avg_bits"] == pytest.approx(Plan.load(artifact / "plan.json").totals["avg_bits"])
    first = rec["int_panels_ms"] if "int_panels_ms" in rec else rec["int_fused_ms"]
    assert c["vs_first"] == pytest.approx(c["ms"] / first)
    assert rec["fp32_ms"] > 0 and "kernel" in rec
    # on the XLA path the default ("auto") is fused: the comparison is against the first artifact fused
    from nasq.bench import bench_infer

    monkeypatch.setenv("NASQ_KERNEL", "xla")
    rec = bench_infer(artifact, run, 1, 8, repeats=1, compare=[other])
    assert "int_panels_ms" not in rec
    assert rec["compare"][0]["vs_first"] == pytest.approx(rec["compare"][0]["ms"] / rec["int_fused_ms"])
    assert rec["fp32_weights"] == str(run)
    # without --teacher the fp32 baseline is the artifact's architecture with random weights (no traceback)
    assert main(["bench", "infer", "--artifact", str(artifact), "--batch-size", "1", "--seq-len", "8",
                 "--repeats", "1"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rec["fp32_weights"] == "random" and rec["fp32_ms"] > 0


@pytest.mark.slow  # torch + ONNX export and quantization of a tiny model: about 30 s
def test_bench_infer_external_frameworks(artifact):
    """`bench infer --external`: PyTorch and ONNX Runtime (fp32, dynamic int8, nasq's ONNX export) timed in the
    same rounds, each with its ratio to the fp32 JAX forward; the XLA integer path and XLA's attention core too
    where the native kernel runs."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from nasq.bench import bench_infer
    from nasq.kernels import native

    rec = bench_infer(artifact, None, 1, 8, repeats=1, external=True, threads=1)
    names = ["torch_fp32", "torch_dyn_int8", "ort_fp32", "ort_dyn_int8", "ort_nasq"]
    if native.resolve_kernel() == "native":
        names += ["int_xla", "int_panels_xla_attention"]
    for name in names:
        assert rec[f"{name}_ms"] > 0
        assert rec[f"ratio_{name}"] == pytest.approx(rec[f"{name}_ms"] / rec["fp32_ms"])
    assert rec["external_threads"] == 1 and rec["torch"] and rec["onnxruntime"]


def test_bench_infer_external_needs_the_extras(artifact, tmp_path, monkeypatch):
    import sys

    from nasq.bench import bench_infer, external_forwards

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    with pytest.raises(NasqError, match=r"parity,onnx"):
        external_forwards(artifact, np.zeros((1, 8), np.int32), 1, tmp_path, 2)
    with pytest.raises(NasqError, match="--threads"):
        bench_infer(artifact, None, 1, 8, repeats=1, external=True, threads=0)
