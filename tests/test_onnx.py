"""ONNX export (optional extra): the graph reproduces nasq's integer path, keeps 2/4/8-bit codes at their width,
widens the rest as documented, and handles bad input like every other nasq output."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx

from nasq.errors import NasqError
from nasq.export.onnx import container_bits, export_onnx, load_onnx, verify_onnx
from nasq.export.reader import load_artifact
from nasq.export.writer import export_model
from tests.test_export import _batch, build_quant_model

# ORT's LayerNorm / GELU / softmax round differently from XLA's, which can move an activation code by one step
TOL = 1e-3


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    """Tiny artifact with every width 0..8, pruned heads and a fully pruned linear (tests/test_export.FIXED_BITS)."""
    model, plan = build_quant_model(tiny_model_dir)
    return export_model(model, plan, tmp_path_factory.mktemp("art") / "model.nasq", task="sst2", num_labels=2,
                        source_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def exported_onnx(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(artifact, out), out


def test_container_bits():
    assert [container_bits(b) for b in range(1, 9)] == [2, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError):
        container_bits(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_onnx_logits_match_int_path(artifact, exported_onnx, seed):
    _, path = exported_onnx
    ids, tt, am = _batch(seed, b=5, s=17)
    ref = np.asarray(load_artifact(artifact)(ids, tt, am))
    got = load_onnx(path)(ids, tt, am)
    assert got.shape == ref.shape == (5, 2) and np.isfinite(got).all()
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    assert np.abs(got - ref).max() < TOL, np.abs(got - ref).max()


def test_onnx_fp32_fixed_tensors(tiny_model_dir, tmp_path):
    """Unquantized embeddings, pooler and classifier are exported as fp32 MatMul / Gather."""
    model, plan = build_quant_model(tiny_model_dir, unsearched_bits=32, word_bits=32, seed=3)
    art = export_model(model, plan, tmp_path / "m.nasq", task="sst2", num_labels=2, source_dir=tiny_model_dir)
    export_onnx(art, tmp_path / "m.onnx")
    ids, tt, am = _batch(1)
    ref, got = np.asarray(load_artifact(art)(ids, tt, am)), load_onnx(tmp_path / "m.onnx")(ids, tt, am)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    assert np.abs(got - ref).max() < TOL


def test_codes_stored_in_their_containers(exported_onnx):
    """1-2-bit codes as INT2, 3-4-bit as INT4, wider as INT8 (packed in the file), and the report counts them."""
    rep, path = exported_onnx
    m = onnx.load(str(path))
    by_type = {}
    for t in m.graph.initializer:
        if "_w" in t.name and t.data_type in (onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.INT8):
            bits = int(t.name.split("_w")[1].split("_")[0])
            by_type.setdefault(onnx.TensorProto.DataType.Name(t.data_type), set()).add(bits)
            n = int(np.prod(t.dims))
            assert len(t.raw_data) == -(-n * container_bits(bits) // 8)  # densely packed
    assert by_type["INT2"] <= {1, 2} and by_type["INT4"] <= {3, 4} and by_type["INT8"] <= {5, 6, 7, 8}
    assert set(rep.weights_by_bits) == {1, 2, 3, 4, 5, 6, 7, 8}
    assert rep.code_bytes_onnx > rep.code_bytes_nasq  # 3- and 5-7-bit codes are widened
    assert rep.onnx_file_bytes == path.stat().st_size
    props = {p.key: p.value for p in m.metadata_props}
    assert props["nasq_task"] == "sst2" and props["nasq_num_labels"] == "2"


def test_no_widening_at_2_4_8_bits(tiny_model_dir, tmp_path):
    """A plan whose widths are all ONNX containers stores exactly nasq's code bytes."""
    fixed = {"encoder.layer.0.attention.self.query": (2, 4, 8, 0)}
    model, plan = build_quant_model(tiny_model_dir, fixed_bits=fixed, seed=5)
    art = export_model(model, plan, tmp_path / "m.nasq", task="sst2", num_labels=2, source_dir=tiny_model_dir)
    rep = export_onnx(art, tmp_path / "m.onnx")
    assert set(rep.weights_by_bits) <= {2, 4, 8}
    assert rep.code_bytes_onnx == rep.code_bytes_nasq


def test_refuses_overwrite_and_directories(artifact, exported_onnx, tmp_path):
    _, path = exported_onnx
    before = path.read_bytes()
    with pytest.raises(NasqError, match="--overwrite"):
        export_onnx(artifact, path)
    assert path.read_bytes() == before
    with pytest.raises(NasqError, match="directory"):
        export_onnx(artifact, tmp_path)
    export_onnx(artifact, path, overwrite=True)
    assert path.read_bytes() == before  # deterministic


def test_bad_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(NasqError, match="ONNX Runtime cannot load"):
        load_onnx(bad)
    with pytest.raises(NasqError, match="no such"):
        load_onnx(tmp_path / "missing.onnx")


def test_bad_artifact_is_refused(tmp_path):
    with pytest.raises(NasqError):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_verify_on_dev_set(artifact, exported_onnx, glue_dir):
    from nasq.config import build_config

    cfg = build_config(("t", {"data": {"data_dir": str(glue_dir)}, "model": {"max_len": 32}}))
    res = verify_onnx(exported_onnx[1], artifact, cfg)
    assert res["task"] == "sst2" and res["dev_rows"] == 872
    assert res["prediction_agreement"] >= 0.995
    assert set(res["onnx"]) == {"accuracy"}


def test_cli_export_onnx(artifact, tmp_path, capsys):
    from nasq.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", str(artifact), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ONNX / nasq" in text and out.is_file()
    before = out.read_bytes()
    assert main(["export", str(artifact), "--format", "onnx", "--out", str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(artifact), "--out", str(tmp_path / "x.nasq"), "--verify"]) == 2
    assert "--verify compares an ONNX export" in capsys.readouterr().err and not (tmp_path / "x.nasq").exists()
    assert json.loads((artifact / "manifest.json").read_text())["task"] == "sst2"


def test_python_api(artifact, tmp_path):
    import nasq

    rep = nasq.export_onnx(artifact, tmp_path / "api.onnx")
    assert rep["onnx_file_bytes"] == (tmp_path / "api.onnx").stat().st_size and rep["opset"] == 25
    assert "export_onnx" in dir(nasq)
