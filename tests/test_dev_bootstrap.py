"""experiments/dev_bootstrap.py: the paired bootstrap of dev-metric differences over dev rows."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from nasq.data.glue import get_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def boot():
    spec = importlib.util.spec_from_file_location("dev_bootstrap", REPO / "experiments" / "dev_bootstrap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_bootstrap(boot):
    """Each artifact's metric is its full-dev metric; the differences are paired (an artifact against itself: a
    zero difference on every resample), and a model right on more rows is better on most resamples."""
    task = get_task("sst2")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, labels, 1 - labels)  # about 90% right
    bad = np.where(rng.random(400) < 0.7, labels, 1 - labels)  # about 70% right
    idx = boot.resample_indices(400, 300, seed=1)
    assert idx.shape == (300, 400) and idx.min() >= 0 and idx.max() < 400
    np.testing.assert_array_equal(idx, boot.resample_indices(400, 300, seed=1))  # seeded
    out = boot.paired_summary(task, {"good": good, "same": good.copy(), "bad": bad}, labels, idx)
    a = out["artifacts"]
    assert out["reference"] == "good" and out["metric"] == "accuracy" and out["resamples"] == 300
    assert a["good"]["metric"] == pytest.approx((good == labels).mean())
    assert a["same"]["diff_std"] == 0 and a["same"]["disagree"] == 0 and a["same"]["p_better"] == 0
    assert a["bad"]["diff"] == pytest.approx((bad == labels).mean() - (good == labels).mean())
    assert a["bad"]["p_better"] < 0.01 and a["bad"]["disagree"] == int((bad != good).sum())
    # the sampling std of an accuracy near p on n rows is about sqrt(p (1 - p) / n)
    assert a["good"]["metric_std"] == pytest.approx(np.sqrt(0.9 * 0.1 / 400), rel=0.3)


def test_groups_average_their_members(boot):
    """A group (a method's seeds) scores the mean of its members, on the full dev set and on every resample, so its
    difference to another group is the difference of the two means, paired over the same rows."""
    task = get_task("sst2")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)

    def model(p):
        return np.where(rng.random(300) < p, labels, 1 - labels)

    a, b = [model(0.85) for _ in range(3)], [model(0.75) for _ in range(3)]
    idx = boot.resample_indices(300, 200, seed=2)
    out = boot.paired_summary(task, {"A": a, "B": b, "A0": a[0]}, labels, idx)["artifacts"]
    acc = [(p == labels).mean() for p in a + b]
    assert out["A"]["metric"] == pytest.approx(np.mean(acc[:3])) and out["A"]["members"] == 3
    assert out["B"]["diff"] == pytest.approx(np.mean(acc[3:]) - np.mean(acc[:3]))
    per_resample = np.mean([[(p[i] == labels[i]).mean() for i in idx] for p in b], axis=0) - np.mean(
        [[(p[i] == labels[i]).mean() for i in idx] for p in a], axis=0)
    assert out["B"]["diff_mean"] == pytest.approx(per_resample.mean())
    assert out["B"]["diff_std"] == pytest.approx(np.std(per_resample, ddof=1))
    assert out["B"]["disagree"] == pytest.approx(np.mean([(p != q).sum() for p, q in zip(b, a)]))
    assert "disagree" not in out["A0"] and "members" not in out["A0"]  # one artifact against a group of three
    assert out["B"]["p_better"] < 0.01


def test_bad_input_is_a_clear_error(boot, tmp_path, capsys):
    """An unknown task or a missing artifact: exit 2 with what was wrong, no traceback."""
    assert boot.main(["--task", "nope", "--data-dir", str(tmp_path), str(tmp_path / "a.nasq")]) == 2
    assert "dev_bootstrap: error:" in capsys.readouterr().err
    assert boot.main(["--task", "cola", "--data-dir", str(tmp_path), str(tmp_path / "missing.nasq")]) == 2
    err = capsys.readouterr().err
    assert "dev_bootstrap: error:" in err and "missing.nasq" in err
    assert boot.main(["--task", "cola", "--data-dir", str(tmp_path), ","]) == 2
    assert "empty artifact group" in capsys.readouterr().err


def test_artifacts_scored_on_different_dev_rows_are_refused(boot, tmp_path, monkeypatch, capsys):
    """Paired resamples need one dev set: an artifact whose dev split has other rows is an error, not a silent mix."""
    from types import SimpleNamespace

    sizes = iter([300, 299])
    monkeypatch.setattr(boot, "load_artifact", lambda path: path)
    monkeypatch.setattr(boot, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(boot, "artifact_dev_set",
                        lambda model, tok, cfg, source: (None, SimpleNamespace(labels=np.zeros(next(sizes), int)), None))
    monkeypatch.setattr(boot, "predict_logits", lambda model, dev, bs, buckets: np.zeros((len(dev.labels), 2)))
    assert boot.main(["--task", "sst2", "--data-dir", str(tmp_path), "a.nasq,b.nasq"]) == 2
    err = capsys.readouterr().err
    assert "b.nasq: its dev set has 299 rows, the first artifact's 300" in err and "Traceback" not in err
