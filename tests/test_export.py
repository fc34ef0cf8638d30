"""Artifact export / load: round trip, bytes vs cost model, integrity checks, overwrite refusal."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from nasq.contract.plan import Plan
from nasq.errors import NasqError
from nasq.export.format import TENSORS, VERSION
from nasq.export.format import manifest_digest as _manifest_digest
from nasq.export.format import sha256 as _sha256
from nasq.export.reader import load_artifact
from nasq.export.writer import export_model, predicted_artifact_bytes
from nasq.kernels.int_linear import PackedLinear, pack_linear
from nasq.quant.packing import pack_rows, tensor_nbytes
from nasq.quant.quantizer import quantize_codes

NAMES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
# hand-picked groups (4 per tensor): pruned head 1 in layer 0's value, heads 0/2/3 in layer 1's value,
# a fully pruned attention.output.dense; every width 0..8 appears (3, 5, 6, 7 densely packed since format 2).
FIXED_BITS = {
    "encoder.layer.0.attention.self.value": (8, 0, 4, 2),
    "encoder.layer.1.attention.self.value": (0, 2, 0, 0),
    "encoder.layer.1.attention.output.dense": (0, 0, 0, 0),
    "encoder.layer.0.attention.self.query": (1, 3, 8, 0),
    "encoder.layer.1.attention.self.query": (5, 6, 7, 3),
}
TOL = 1e-5  # int path vs fake-quant, max |logit diff| (observed <= 1.5e-8 on logits of ~0.05)


def build_quant_model(model_dir, *, unsearched_bits=8, word_bits=8, other_bits=32, seed=0, fixed_bits=None):
    """Tiny fixed-plan classifier via ``nasq.contract.plan.make_plan`` + ``apply_plan``; returns (model, plan dict).

    ``fixed_bits`` (default ``FIXED_BITS``): hand-picked bits of some tensors; the others draw from {0, 2, 4, 8}."""
    from nasq.contract.plan import make_plan
    from nasq.contract.space import Fixed, SearchedTensor, SpaceInfo
    from nasq.models.loading import load_pretrained
    from nasq.models.surgery import model_param_shapes
    from nasq.quant.apply import apply_plan

    fixed_bits = FIXED_BITS if fixed_bits is None else fixed_bits
    model, cfg, _ = load_pretrained(model_dir, 2, seed=seed)
    rng = np.random.default_rng(seed)
    tensors, bits_all = [], []
    for i in range(cfg.num_hidden_layers):
        for n in NAMES:
            path = f"encoder.layer.{i}.{n}"
            rows = cfg.intermediate_size if n == "intermediate.dense" else cfg.hidden_size
            cols = cfg.intermediate_size if n == "output.dense" else cfg.hidden_size
            sizes = tuple(len(a) for a in np.array_split(np.arange(rows), 4))
            bits = fixed_bits.get(path, tuple(int(b) for b in rng.choice([0, 2, 4, 8], 4, p=[.1, .3, .3, .3])))
            tensors.append(SearchedTensor(path=path, rule="test", rows=rows, cols=cols, group_sizes=sizes,
                                          choices=tuple(range(9)), has_bias=True, kind="linear"))
            bits_all.append(bits)
    fixed = Fixed(word_embeddings_bits=word_bits, other_embeddings_bits=other_bits,
                  unsearched_linear_bits=unsearched_bits)
    plan = make_plan(tensors, bits_all, space=SpaceInfo(name="test", source="test", fixed=fixed), budget=None,
                     param_shapes=model_param_shapes(model), provenance={"method": "test"})
    return apply_plan(model, plan), plan.to_dict()


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    model, plan = build_quant_model(tiny_model_dir)
    out = export_model(model, plan, tmp_path_factory.mktemp("art") / "model.nasq", task="sst2", num_labels=2,
                       source_dir=tiny_model_dir)
    return model, plan, out


def _batch(seed=0, b=4, s=12, pad=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (b, s)).astype(np.int32)
    ids[:, 0] = 101
    tt = np.zeros_like(ids)
    tt[:, s // 2:] = 1
    am = np.ones_like(ids)
    am[1, s - pad:] = 0
    ids[1, s - pad:] = 0
    return ids, tt, am


def fake_quant_logits(model, ids, tt, am):
    return np.asarray(nnx.jit(lambda m, a, b, c: m(a, b, c))(model, ids, tt, am))


# ------------------------------------------------------------------------------------------- packing
def test_pack_rows_matches_per_group_packing():
    """The one packer (vectorised per width) equals packing group by group: segments by ascending width, rows
    in original order, one scale per kept group, kept biases; pruned groups absent."""
    from nasq.quant.packing import pack_codes

    rng = np.random.default_rng(1)
    w = rng.standard_normal((34, 13)).astype(np.float32)  # 13 columns: 3/5-bit rows end mid-byte
    bias = rng.standard_normal(34).astype(np.float32)
    sizes, bits = [5, 5, 5, 5, 4, 5, 5], [4, 0, 1, 4, 8, 3, 5]
    scales = np.array([.3, .2, .5, .4, .02, .6, .1], np.float32)
    starts = np.cumsum([0, *sizes[:-1]])
    got = pack_rows(w, bias, sizes, bits, scales)
    assert sorted(got) == ["bias", "scale", "seg1", "seg3", "seg4", "seg5", "seg8"]
    assert got["seg3"].shape == (5, 5) and got["seg5"].shape == (5, 9)  # ceil(13*3/8), ceil(13*5/8)
    assert sum(a.nbytes for a in got.values()) == tensor_nbytes(sizes, 13, bits)
    for b in (1, 3, 4, 5, 8):
        groups = [g for g, gb in enumerate(bits) if gb == b]
        codes = np.concatenate([np.asarray(quantize_codes(w[starts[g]:starts[g] + sizes[g]], scales[g], b))
                                for g in groups])
        np.testing.assert_array_equal(pack_codes(codes, b), got[f"seg{b}"])
    order = [g for b in (1, 3, 4, 5, 8) for g, gb in enumerate(bits) if gb == b]
    np.testing.assert_array_equal(scales[order], got["scale"])
    np.testing.assert_array_equal(np.concatenate([bias[starts[g]:starts[g] + sizes[g]] for g in order]),
                                  got["bias"])
    assert pack_rows(w, bias, [34], [0], [1.0]) == {}
    p = pack_linear(w, bias, sizes, bits, scales)  # the kernel's PackedLinear holds exactly these arrays
    for b, packed in p.segments:
        np.testing.assert_array_equal(np.asarray(packed), got[f"seg{b}"])


# ------------------------------------------------------------------------------------------ round trip
def test_roundtrip_codes_exact(exported):
    from nasq.quant.layers import QuantLinear

    model, _, out = exported
    im = load_artifact(out, unpack="fused")  # the packed linears themselves
    lin = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
           "attn_out": "attention.output.dense", "inter": "intermediate.dense", "out": "output.dense"}
    mods = {m.path: m for _, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)}
    checked = 0
    for i, lp in enumerate(im.params["layers"]):
        for key, name in lin.items():
            q, p = mods[f"encoder.layer.{i}.{name}"], lp[key]
            assert isinstance(p, PackedLinear)
            w_rows = np.asarray(q.kernel[...]).T
            gid = np.repeat(np.arange(len(q.group_sizes)), q.group_sizes)
            idx = np.asarray(p.out_index)
            assert set(idx) == set(np.flatnonzero(q.rows_bits() > 0))
            if not len(idx):
                assert p.segments == () and p.nbytes() == 0
                continue
            codes = np.asarray(p.unpacked_codes())
            scales = np.asarray(q.scales[...])[gid[idx]]
            rb = q.rows_bits()[idx]
            want = np.zeros_like(codes)
            for b in np.unique(rb):
                sel = rb == b
                want[sel] = np.asarray(quantize_codes(w_rows[idx[sel]], scales[sel][:, None], int(b), q.mode))
            np.testing.assert_array_equal(codes, want)
            # dequantized rows equal the QAT model's fake-quant rows bit for bit
            np.testing.assert_array_equal(codes * np.asarray(p.row_scale)[:, None],
                                          np.asarray(q.quantized_weight())[idx])
            checked += 1
    assert checked >= 10
    # per-row int8 embedding and int8 classifier too
    w = np.asarray(im.params["embeddings"]["word"].codes)
    qe = next(m for _, m in nnx.iter_modules(model) if getattr(m, "path", "") == "embeddings.word_embeddings")
    deq = w.astype(np.float32) * np.asarray(im.params["embeddings"]["word"].row_scale)[:, None]
    np.testing.assert_array_equal(deq, np.asarray(qe.quantized_weight()))


@pytest.mark.parametrize("unpack", ["fused", "load"])
def test_int_logits_match_fake_quant(exported, unpack):
    model, _, out = exported
    im = load_artifact(out, unpack=unpack)
    assert im.meta.active_heads == ((0, 2, 3), (1,))
    ids, tt, am = _batch()
    ref = fake_quant_logits(model, ids, tt, am)
    got = np.asarray(im(ids, tt, am))
    assert got.shape == ref.shape == (4, 2)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    assert np.abs(got - ref).max() < TOL, np.abs(got - ref).max()


def test_int_logits_fp32_fixed_tensors(tiny_model_dir, tmp_path):
    """Unquantized embeddings / pooler / classifier (fixed bits 32) stay fp32 in the artifact."""
    model, plan = build_quant_model(tiny_model_dir, unsearched_bits=32, word_bits=32, seed=3)
    out = export_model(model, plan, tmp_path / "m.nasq", task="sst2", num_labels=2, source_dir=tiny_model_dir)
    im = load_artifact(out)
    assert not isinstance(im.params["classifier"], PackedLinear)
    ids, tt, am = _batch(1)
    ref, got = fake_quant_logits(model, ids, tt, am), np.asarray(im(ids, tt, am))
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    assert np.abs(got - ref).max() < TOL
    m = json.loads((out / "manifest.json").read_text())
    assert m["tensor_bytes"] == m["predicted_bytes"] == plan["totals"]["artifact_tensor_bytes"]


# ----------------------------------------------------------------------------------------------- bytes
def test_payload_bytes_equal_cost_model(exported):
    from safetensors.numpy import load_file

    _, plan, out = exported
    t = load_file(str(out / TENSORS))
    for pt in plan["tensors"]:
        got = sum(a.nbytes for k, a in t.items() if k.rpartition(".")[0] == pt["path"])
        assert got == tensor_nbytes(pt["group_sizes"], pt["cols"], pt["bits"], True), pt["path"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["searched_tensor_bytes"] == m["searched_predicted_bytes"] == plan["totals"]["searched_bytes"]
    assert m["searched_predicted_bytes"] == sum(tensor_nbytes(t["group_sizes"], t["cols"], t["bits"], t["has_bias"])
                                                for t in plan["tensors"])
    assert m["tensor_bytes"] == sum(a.nbytes for a in t.values())
    assert m["tensor_bytes"] == m["predicted_bytes"]  # exact, fixed tensors included
    assert m["payload_vs_predicted"] == 1.0
    assert m["format"] == "nasq-artifact" and m["version"] == VERSION == 2 and m["task"] == "sst2"
    # every width is stored, 3/5/6/7 bits densely: ceil(cols*b/8) bytes per row
    q = "encoder.layer.1.attention.self.query"
    for b, rows in ((3, 8), (5, 8), (6, 8), (7, 8)):
        assert t[f"{q}.seg{b}"].shape == (rows, 32 * b // 8)
    for name in ("plan.json", "config.json", "layout.json", "vocab.txt", TENSORS):
        assert name in m["files"]


def test_predicted_bytes_recomputed_matches_plan(exported):
    """The exporter recomputes the artifact's bytes with the cost model from the model's shapes: the plan's number."""
    from nasq.export.writer import model_tensors

    model, plan, _ = exported
    _, _, shapes = model_tensors(model)
    assert predicted_artifact_bytes(Plan.from_dict(plan), shapes) == plan["totals"]["artifact_tensor_bytes"]


def test_refuses_overwrite(exported):
    """Without ``overwrite`` an existing artifact is refused and left as it was, byte for byte."""
    model, plan, out = exported

    def snapshot():
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = snapshot()
    with pytest.raises(NasqError, match="--overwrite"):
        export_model(model, plan, out, task="sst2", num_labels=2)
    assert snapshot() == before


def test_overwrite_replaces(exported, tmp_path):
    model, plan, out = exported
    dst = tmp_path / "a.nasq"
    shutil.copytree(out, dst)
    (dst / "stale.bin").write_bytes(b"x")
    export_model(model, plan, dst, task="sst2", num_labels=2, overwrite=True)
    assert not (dst / "stale.bin").exists()
    load_artifact(dst)


# ----------------------------------------------------------------------------------------- corruption
@pytest.fixture
def copy(exported, tmp_path):
    dst = tmp_path / "c.nasq"
    shutil.copytree(exported[2], dst)
    return dst


def _rewrite_manifest(path, **updates):
    m = json.loads((path / "manifest.json").read_text())
    m.update(updates)
    m["manifest_sha256"] = _manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_truncated_file(copy):
    d = (copy / TENSORS).read_bytes()
    (copy / TENSORS).write_bytes(d[: len(d) // 2])
    with pytest.raises(NasqError, match=r"tensors.safetensors.*truncated.*corrupt.*re-export"):
        load_artifact(copy)


def test_flipped_byte(copy):
    d = bytearray((copy / TENSORS).read_bytes())
    d[len(d) - 10] ^= 0x01
    (copy / TENSORS).write_bytes(bytes(d))
    with pytest.raises(NasqError, match=r"tensors.safetensors.*sha256.*corrupt"):
        load_artifact(copy)


@pytest.mark.parametrize("version", [0, 3, True, 2.0, "2"])
def test_wrong_version(copy, version):
    _rewrite_manifest(copy, version=version)
    with pytest.raises(NasqError, match="artifact format version .* unsupported, this nasq reads 1 and 2"):
        load_artifact(copy)


def test_v1_artifact_with_3_bit_rows_refused(copy):
    """Format 1 stored 3-bit codes in 4-bit (5..7 in 8-bit) containers: refused before the tensors are read."""
    _rewrite_manifest(copy, version=1)
    with pytest.raises(NasqError, match=r"version 1 stored 3-bit codes in 4-bit.*layer\.0\.attention\.self\.query "
                                        r"has 3-bit rows.*Re-export.*`nasq export RUN --out DIR`"):
        load_artifact(copy)


def test_v1_artifact_with_unchanged_widths_loads(tiny_model_dir, tmp_path):
    """0/1/2/4/8-bit rows have the same bytes in formats 1 and 2: a version-1 artifact of them still loads."""
    old_widths = {p: tuple(4 if b in (3, 5, 6, 7) else b for b in bits) for p, bits in FIXED_BITS.items()}
    model, plan = build_quant_model(tiny_model_dir, fixed_bits=old_widths)
    out = export_model(model, plan, tmp_path / "v1.nasq", task="sst2", num_labels=2, source_dir=tiny_model_dir)
    widths = {b for tn in plan["tensors"] for b in tn["bits"]}
    assert widths == {0, 1, 2, 4, 8}
    ids, tt, am = _batch(4)
    v2 = np.asarray(load_artifact(out)(ids, tt, am))
    _rewrite_manifest(out, version=1)
    im = load_artifact(out)
    assert im.manifest["version"] == 1
    np.testing.assert_array_equal(np.asarray(im(ids, tt, am)), v2)
    assert np.abs(v2 - fake_quant_logits(model, ids, tt, am)).max() < TOL


def test_missing_manifest(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(NasqError, match="manifest.json.*missing"):
        load_artifact(copy)


def test_missing_file(copy):
    (copy / "layout.json").unlink()
    with pytest.raises(NasqError, match="layout.json: missing"):
        load_artifact(copy)


def test_missing_tensor(copy):
    from safetensors.numpy import load_file, save

    t = load_file(str(copy / TENSORS))
    del t["encoder.layer.0.attention.self.value.seg4"]
    del t["classifier.bias"]
    data = save(t)
    (copy / TENSORS).write_bytes(data)
    m = json.loads((copy / "manifest.json").read_text())
    m["files"][TENSORS] = {"bytes": len(data), "sha256": _sha256(data)}
    _rewrite_manifest(copy, files=m["files"])
    with pytest.raises(NasqError, match=r"missing 2 tensors: .*value.seg4.*classifier.bias"):
        load_artifact(copy)


def test_edited_manifest(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["num_labels"] = 3
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(NasqError, match="manifest.json: checksum mismatch"):
        load_artifact(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(NasqError, match="not a nasq artifact"):
        load_artifact(tmp_path / "nope")


def test_fuzz_byte_flips(exported, copy):
    """Random single-byte flips in any file: always NasqError, never a model with changed outputs."""
    rng = np.random.default_rng(0)
    names = sorted(p.name for p in copy.iterdir())
    originals = {n: (copy / n).read_bytes() for n in names}
    for _ in range(25):
        n = names[rng.integers(len(names))]
        d = bytearray(originals[n])
        pos = int(rng.integers(len(d)))
        d[pos] ^= int(rng.integers(1, 256))
        (copy / n).write_bytes(bytes(d))
        try:
            load_artifact(copy)
        except NasqError:
            pass
        else:  # only possible for a manifest whitespace flip that keeps the JSON content identical
            assert n == "manifest.json"
            assert json.loads(bytes(d)) == json.loads(originals[n])
        (copy / n).write_bytes(originals[n])


# ------------------------------------------------------------------------------------ predict / cli
def test_predict_texts(exported):
    from nasq.export.reader import predict_texts

    res = predict_texts(exported[2], ["a fine film", "dull and long"], max_len=16)
    assert len(res) == 2 and all(r["label"] in (0, 1) and len(r["scores"]) == 2 for r in res)
    assert abs(sum(res[0]["scores"]) - 1) < 1e-5


def test_cli_parsers():
    import argparse

    from nasq.commands.export import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    a = p.parse_args(["export", "RUN", "--out", "m.nasq", "--overwrite"])
    assert a.run == "RUN" and a.out == "m.nasq" and a.overwrite
    a = p.parse_args(["predict", "--artifact", "m.nasq", "t1", "t2", "--pair", "p1", "--pair", "p2"])
    assert a.texts == ["t1", "t2"] and a.pair == ["p1", "p2"]


def test_export_artifact_from_run(exported, tiny_model_dir, tmp_path):
    from nasq.contract.model_dir import save_model_dir
    from nasq.export.writer import export_artifact

    model, plan, _ = exported
    run = tmp_path / "run"
    save_model_dir(run / "model", model, source_model_dir=tiny_model_dir, num_labels=2, task="sst2", plan=plan)
    out = export_artifact(run, tmp_path / "m.nasq")
    ids, tt, am = _batch(2)
    got = np.asarray(load_artifact(out)(ids, tt, am))
    ref = fake_quant_logits(model, ids, tt, am)
    assert np.abs(got - ref).max() < TOL
    with pytest.raises(NasqError, match="--overwrite"):
        export_artifact(run, out)


def test_model_card(exported, tiny_model_dir, tmp_path):
    """README.md: listed and checksummed in the manifest; the plan's bytes and bits per rule, the budget, the QAT
    run's dev metric and command (from its run.json)."""
    import json

    from nasq.contract.model_dir import save_model_dir
    from nasq.contract.plan import Plan
    from nasq.export.card import bits_by_rule
    from nasq.export.writer import export_artifact

    model, plan, _ = exported
    run = tmp_path / "run"
    save_model_dir(run / "model", model, source_model_dir=tiny_model_dir, num_labels=2, task="sst2", plan=plan)
    (run / "run.json").write_text(json.dumps({"kind": "qat", "dev": {"accuracy": 0.8125}, "total_steps": 7,
                                              "train_rows": 96, "command": "nasq finetune --plan p.json"}))
    out = export_artifact(run, tmp_path / "m.nasq")
    manifest = json.loads((out / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    assert manifest["files"]["README.md"]["bytes"] == len(card.encode())
    p = Plan.from_dict(plan)
    assert f"{p.totals['searched_bytes']:,} bytes" in card and f"{manifest['tensor_bytes']:,} bytes" in card
    assert "accuracy 0.8125" in card and "`nasq finetune --plan p.json`" in card and "7 steps" in card
    rows = bits_by_rule(p)
    assert sum(r["weights"] for r in rows) == sum(t.rows * t.cols for t in p.tensors)
    for r in rows:
        assert abs(sum(r["share"].values()) - 1) < 1e-9 and f"| {r['rule']} | {r['tensors']} |" in card
    load_artifact(out)  # the card is verified like every other file
    (out / "README.md").write_text(card + "edited")
    with pytest.raises(NasqError, match="README.md"):
        load_artifact(out)


def test_model_card_with_int_metrics(exported, tiny_model_dir, glue_dir, tmp_path, capsys):
    """`nasq export --eval`: the dev metrics measured through the finished artifact's integer path are in its card
    (and equal `nasq eval --artifact`'s); the artifact still verifies."""
    from nasq.cli import main
    from nasq.config import build_config
    from nasq.contract.model_dir import save_model_dir
    from nasq.export.reader import evaluate_artifact

    model, plan, _ = exported
    run = tmp_path / "run"
    save_model_dir(run / "model", model, source_model_dir=tiny_model_dir, num_labels=2, task="sst2", plan=plan)
    out = tmp_path / "m.nasq"
    assert main(["export", str(run), "--out", str(out), "--eval", "--data-dir", str(glue_dir),
                 "--set", "model.max_len=32"]) == 0
    card = (out / "README.md").read_text()
    ev = evaluate_artifact(out, build_config(("t", {"data": {"data_dir": str(glue_dir)}, "model": {"max_len": 32}})))
    assert f"sst2 dev, 872 rows, kernel {ev['kernel']}): accuracy {ev['accuracy']:.4f}" in card
    assert "not measured at export" not in card
    load_artifact(out)


def test_intbert_is_pytree(exported):
    im = load_artifact(exported[2])
    leaves, treedef = jax.tree_util.tree_flatten(im)
    im2 = jax.tree_util.tree_unflatten(treedef, leaves)
    ids, tt, am = _batch(3)
    np.testing.assert_array_equal(np.asarray(im(ids, tt, am)), np.asarray(im2(ids, tt, am)))
