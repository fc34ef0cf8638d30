"""Untrusted inputs and users' files (SECURITY.md): every file nasq loads is bounded and verified before use, and
nothing a user owns is deleted or half-written. One test per class of attack, then fuzzers that mutate real tiny
artifacts, model directories and run directories and *recompute the checksums*, so a checksum can never hide a
missing check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiers import examples

from nasq.cli import main
from nasq.contract.model_dir import load_model_dir
from nasq.errors import NasqError
from nasq.export.format import LAYOUT, TENSORS, manifest_digest
from nasq.export.reader import load_artifact
from nasq.io import (
    check_output_path,
    finite_number,
    nasq_made,
    parse_json,
    read_bytes,
    read_json,
    write_atomic,
)

# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    from test_export import build_quant_model

    from nasq.export.writer import export_model

    model, plan = build_quant_model(tiny_model_dir, seed=7)
    return export_model(model, plan, tmp_path_factory.mktemp("untrusted") / "m.nasq", task="sst2", num_labels=2,
                        source_dir=tiny_model_dir)


@pytest.fixture
def art(artifact, tmp_path):
    dst = tmp_path / "a.nasq"
    shutil.copytree(artifact, dst)
    return dst


def reseal(path, **manifest_updates):
    """Recompute every file's size and sha256 and the manifest's own checksum (what an attacker can do)."""
    m = json.loads((path / "manifest.json").read_text())
    for name in m["files"]:
        d = (path / name).read_bytes()
        m["files"][name] = {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
    m.update(manifest_updates)
    m["manifest_sha256"] = manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def refused(fn, match=None):
    """``fn()`` raises ``NasqError`` (naming what is wrong) while Python allocates little memory."""
    tracemalloc.start()
    try:
        with pytest.raises(NasqError, match=match):
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MiB while refusing"


# ---------------------------------------------------------------------------------- the read layer itself
def test_read_bytes_checks_size_and_links_before_reading(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"s3cret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(NasqError, match="outside"):
        read_bytes(root / "link", what="file", max_bytes=100, root=root)
    big = root / "big.bin"
    with open(big, "wb") as f:  # a sparse 5 GB file: refused from its size, never read
        f.truncate(5 * 2**30)
    refused(lambda: read_bytes(big, what="file", max_bytes=2**20, root=root), "more than")
    refused(lambda: read_bytes(big, what="file", max_bytes=2**40, size=10, root=root), "declared")
    with pytest.raises(NasqError, match="not a regular file"):
        read_bytes(root, what="file", max_bytes=10)


@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ('{"a": NaN}', "NaN"),
    ('{"a": Infinity}', "Infinity"),
    ("[1, 2]", "must be a mapping"),
    ('{"a": ' * 70 + "1" + "}" * 70, "nested"),
])
def test_parse_json_rejects(text, needle):
    with pytest.raises(NasqError, match=needle):
        parse_json(text, "x.json")


def test_yaml_alias_bomb_refused(tmp_path, capsys):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    assert main(["finalize", str(tmp_path), "--out", str(tmp_path / "p.json")]) == 2  # warm: parser import
    capsys.readouterr()
    rc = main(["search", "--config", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "elements" in capsys.readouterr().err


def test_read_json_rejects_non_utf8(tmp_path):
    p = tmp_path / "p.json"
    p.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(NasqError, match="UTF-8"):
        read_json(p, what="plan")


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


def test_exported_artifact_gets_normal_permissions(artifact):
    """Files 0666 and the directory 0777, less the umask (not mkstemp's 0600): a shared artifact is readable."""
    mask = os.umask(0o022)
    os.umask(mask)
    for f in artifact.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o777 & ~mask


# ------------------------------------------------------------------------------------------------ artifacts
def test_symlink_inside_artifact_refused(art, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy(art / "config.json", outside)  # same bytes: the checksum would pass
    (art / "config.json").unlink()
    (art / "config.json").symlink_to(outside)
    refused(lambda: load_artifact(art), "outside")


def test_oversized_tensor_file_refused_before_reading(art):
    with open(art / TENSORS, "r+b") as f:
        f.truncate(5 * 2**30)  # 5 GB, sparse
    refused(lambda: load_artifact(art), "declared")  # the manifest's size is checked first
    m = json.loads((art / "manifest.json").read_text())
    m["files"][TENSORS]["bytes"] = 5 * 2**30  # and a manifest that declares it: more than the config allows
    m["manifest_sha256"] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))
    refused(lambda: load_artifact(art), "more than")


def test_huge_run_length_refused(art):
    def grow(d):
        spec = d["modules"]["encoder.layer.0.attention.self.query"]
        spec["bits"] = [[4, 10**12]]
    edit_json(art / LAYOUT, grow)
    reseal(art)
    refused(lambda: load_artifact(art), "layout.json")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 0), ("num_hidden_layers", -1),
                                       ("num_hidden_layers", 1), ("hidden_size", 10**9), ("vocab_size", "30522"),
                                       ("layer_norm_eps", 0.0)])
def test_config_checked_against_layout(art, key, value):
    edit_json(art / "config.json", lambda d: d.update({key: value}))
    reseal(art)
    refused(lambda: load_artifact(art), "config.json|layout.json")


def test_nan_scales_refused(art):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(art / TENSORS))
    name = next(k for k in t if k.endswith(".scale"))
    t[name] = np.full_like(t[name], np.nan)
    save_file(t, str(art / TENSORS))
    reseal(art)
    refused(lambda: load_artifact(art), "non-finite")


def test_num_labels_bounded(art):
    reseal(art, num_labels=10**9)
    refused(lambda: load_artifact(art), "num_labels")


# ---------------------------------------------------------------------------------------- model directories
@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    from nasq.contract.model_dir import save_model_dir
    from nasq.models.loading import load_pretrained

    model, _, _ = load_pretrained(tiny_model_dir, 2)
    out = tmp_path_factory.mktemp("md") / "model"
    save_model_dir(out, model, source_model_dir=tiny_model_dir, num_labels=2, task="sst2")
    return out


@pytest.fixture
def md(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_model_dir_wrong_bias_shape_refused(md):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(md / "state.safetensors"))
    name = next(k for k in t if k.endswith("query.bias"))
    t[name] = t[name][:1]  # would broadcast silently
    save_file(t, str(md / "state.safetensors"))
    refused(lambda: load_model_dir(md), "shape")


def test_model_dir_num_labels_bounded(md):
    edit_json(md / "nasq_model.json", lambda d: d.update(num_labels=10**9))
    refused(lambda: load_model_dir(md), "num_labels")


def test_model_dir_nan_weights_refused(md):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(md / "state.safetensors"))
    name = next(k for k in t if k.endswith("query.kernel"))
    t[name][0, 0] = np.inf
    save_file(t, str(md / "state.safetensors"))
    refused(lambda: load_model_dir(md), "non-finite")


# ------------------------------------------------------------------------------------ users' own files
def test_overwrite_refuses_a_directory_nasq_did_not_make(tmp_path):
    d = tmp_path / "mythesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("precious")
    with pytest.raises(NasqError, match="did not create"):
        check_output_path(d, overwrite=True)
    assert (d / "chapter1.tex").read_text() == "precious"
    assert not nasq_made(d)


def test_nasq_made_recognises_runs_pipelines_and_artifacts_without_marker(tmp_path, artifact):
    run, pipe, user = tmp_path / "run", tmp_path / "pipe", tmp_path / "user"
    (pipe / "search").mkdir(parents=True)
    run.mkdir()
    user.mkdir()
    (run / "run.json").write_text('{"kind": "qat", "status": "done"}')
    (pipe / "search" / "run.json").write_text('{"kind": "search"}')
    (user / "run.json").write_text('{"kind": "thesis"}')
    assert nasq_made(run) and nasq_made(pipe) and nasq_made(artifact) and not nasq_made(user)


def test_finetune_bad_set_loses_nothing(tmp_path, tiny_model_dir, glue_dir, capsys):
    d = tmp_path / "mythesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("precious")
    rc = main(["finetune", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--out", str(d),
               "--overwrite", "--set", "train.epochs=.inf"])
    assert rc == 2 and "epochs" in capsys.readouterr().err
    assert (d / "chapter1.tex").read_text() == "precious"
    rc = main(["finetune", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--out", str(d),
               "--overwrite", "--max-steps", "1"])
    assert rc == 2 and "did not create" in capsys.readouterr().err
    assert (d / "chapter1.tex").read_text() == "precious"


def test_resume_finished_run_is_a_noop(tmp_path, tiny_model_dir, glue_dir, capsys):
    run = tmp_path / "run"
    argv = ["finetune", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--out", str(run),
            "--train-subset", "32", "--max-steps", "2", "--set", "model.max_len=32", "--set", "data.buckets=[32]"]
    assert main(argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    # a new run over it with --overwrite is allowed: nasq made it
    assert (run / ".nasq").is_file() and nasq_made(run)


def test_broken_config_yaml_on_resume(tmp_path, tiny_model_dir, glue_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: [1, 2\n")
    (run / "run.json").write_text('{"kind": "finetune", "status": "running"}')
    rc = main(["finetune", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--out", str(run),
               "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "config.yaml" in err and "Traceback" not in err


def test_unwritable_output_is_a_clean_error(tmp_path, tiny_model_dir, capsys):
    """A command whose output cannot be written (its parent is a file; a read-only directory, where permissions
    apply, i.e. not as root) exits 2 naming the path, with no traceback, and leaves what was there as it was."""
    common = ["baseline", "uniform", "--model", str(tiny_model_dir), "--space", "tiny", "--bits", "4"]
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    assert main([*common, "--out", str(blocker / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert "a_file" in err and "Traceback" not in err and "check the path" in err
    assert blocker.read_text() == "mine"
    if os.geteuid() == 0:
        return  # root ignores directory permissions
    d = tmp_path / "ro"
    d.mkdir()
    (d / "plan.json").write_text("theirs")
    os.chmod(d, 0o500)
    try:
        rc = main([*common, "--out", str(d / "plan.json"), "--overwrite"])
    finally:
        os.chmod(d, 0o700)
    err = capsys.readouterr().err
    assert rc == 2 and str(d) in err and "Traceback" not in err
    assert (d / "plan.json").read_text() == "theirs" and sorted(p.name for p in d.iterdir()) == ["plan.json"]


def test_os_errors_exit_2_with_the_path(tmp_path, monkeypatch, capsys):
    import errno

    from nasq import api

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "plan.json"))

    monkeypatch.setattr(api, "finalize", full)
    assert main(["finalize", str(tmp_path), "--out", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "plan.json" in err and "Traceback" not in err


@pytest.mark.parametrize("label", ["nan", "inf", "-inf"])
def test_regression_labels_must_be_finite(tmp_path, label):
    from nasq.data.glue import get_task, read_tsv

    spec = get_task("stsb")
    p = tmp_path / "train.tsv"
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    p.write_text(header + f"0\tx\tx\tx\t0\tx\tx\ta\tb\t{label}\n")
    with pytest.raises(NasqError, match="finite"):
        read_tsv(spec, p)


# --------------------------------------------------------------------------------------------------- fuzzers
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=False),
                    st.text(max_size=8), st.lists(st.integers(-3, 10**12), max_size=3),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(x, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, data):
    """Replace one value (or drop one key) anywhere in ``doc``, chosen by hypothesis."""
    paths = [p for p, _ in _paths(doc) if p]
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(_VALUES)
    return doc


@settings(max_examples=examples(40), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_artifact_metadata(artifact, tmp_path_factory, data):
    """Mutate layout.json / config.json / manifest.json, recompute every checksum: a clean NasqError (or a model
    whose metadata still describes its tensors), bounded memory, never another exception."""
    art = tmp_path_factory.mktemp("fz") / "a.nasq"
    shutil.copytree(artifact, art)
    name = data.draw(st.sampled_from([LAYOUT, "config.json", "manifest.json"]))
    doc = json.loads((art / name).read_text())
    if name == "manifest.json":
        _mutate(doc, data)
        doc["manifest_sha256"] = manifest_digest(doc)
        (art / name).write_text(json.dumps(doc))
    else:
        (art / name).write_text(json.dumps(_mutate(doc, data)))
        reseal(art)
    tracemalloc.start()
    try:
        im = load_artifact(art)
    except NasqError:
        im = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 128 * 2**20
    if im is not None:  # accepted: its metadata must still describe its tensors, so it runs
        ids = np.array([[101, 2000, 2001, 102, 0]], np.int32)
        logits = np.asarray(im(ids, np.zeros_like(ids), (ids > 0).astype(np.int32)))
        num_labels = json.loads((art / "manifest.json").read_text())["num_labels"]
        assert logits.shape == (1, num_labels) and np.isfinite(logits).all()


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_model_dir(model_dir, tmp_path_factory, data):
    """Mutate a model directory's nasq_model.json / config.json: a clean NasqError or a model, bounded memory, never
    another exception."""
    md = tmp_path_factory.mktemp("fzm") / "model"
    shutil.copytree(model_dir, md)
    name = data.draw(st.sampled_from(["nasq_model.json", "config.json"]))
    doc = json.loads((md / name).read_text())
    (md / name).write_text(json.dumps(_mutate(doc, data)))
    tracemalloc.start()
    try:
        load_model_dir(md)
    except NasqError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 128 * 2**20


@pytest.mark.slow
@settings(max_examples=examples(12), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_run_dir_resume(tmp_path_factory, tiny_model_dir, glue_dir, data, capsys):
    """A run directory whose run.json / config.yaml someone edited: `--resume` exits 0 or 2, never a traceback."""
    import yaml

    from nasq.config import Config

    run = tmp_path_factory.mktemp("fzr") / "run"
    run.mkdir()
    cfg = Config().model_dump(mode="json")
    cfg["model"].update(name=str(tiny_model_dir), max_len=32)
    cfg["data"].update(data_dir=str(glue_dir), train_subset=16, buckets=[32])
    cfg["train"].update(max_steps=1, batch_size=8)
    info = {"kind": "finetune", "status": "running"}
    _mutate(cfg if data.draw(st.booleans()) else info, data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run.json").write_text(json.dumps(info))
    rc = main(["finetune", "--out", str(run), "--resume"])
    assert rc in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


def test_finite_number_takes_only_finite_reals():
    """A number read from a parsed file: ints and floats within float range come back as floats; bools, strings,
    None, non-finite floats and integers beyond float range come back as None (every caller then names the key)."""
    assert finite_number(3) == 3.0 and isinstance(finite_number(3), float)
    assert finite_number(-0.25) == -0.25 and finite_number(0) == 0.0
    for bad in (True, False, "1.0", None, [1.0], float("nan"), float("inf"), -float("inf"), 10**400, -(10**400)):
        assert finite_number(bad) is None, bad
