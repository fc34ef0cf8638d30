"""Hardening (issue 8): SIGKILL + --resume reproduces an uninterrupted run, non-finite losses stop with the last
good checkpoint kept, nothing is overwritten without --overwrite, and user errors exit 2 with a message naming
the file / key. Tiny model only; the SIGKILL tests run real subprocesses (the slow part of this file)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from nasq.cli import main

ENV = {**os.environ, "NASQ_NO_PROGRESS": "1", "JAX_PLATFORMS": "cpu"}
SMALL = ["--set", "train.batch_size=16", "--set", "model.max_len=32", "--set", "data.buckets=[32]"]


def nasq_argv(*args) -> list[str]:
    return [sys.executable, "-m", "nasq.cli", *[str(a) for a in args]]


def search_args(model, glue, out, steps=40):
    return ["search", "--model", model, "--task", "sst2", "--data-dir", glue, "--train-subset", "300", "--space",
            "tiny", "--avg-bits", "3", "--max-steps", str(steps), "--set", "train.checkpoint_every=8",
            "--set", "train.log_every=1", *SMALL, "--out", out]


def finetune_args(model, glue, out, steps=40):
    return ["finetune", "--model", model, "--task", "sst2", "--data-dir", glue, "--train-subset", "300",
            "--max-steps", str(steps), "--set", "train.checkpoint_every=8", "--set", "train.log_every=1",
            *SMALL, "--out", out]


def checkpoint_steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def kill_after_checkpoint(argv, run: Path, min_step: int = 8, timeout: float = 400) -> list[int]:
    """Start `argv`, SIGKILL it as soon as a checkpoint >= min_step exists; returns the steps on disk."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if any(s >= min_step for s in checkpoint_steps(run)):
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc {proc.returncode}) before a checkpoint >= {min_step} appeared: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint within the timeout")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "running"  # really interrupted, not finished
    return checkpoint_steps(run)


def metric_records(run: Path) -> dict[tuple, dict]:
    out = {}
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        r.pop("elapsed_s", None)
        key = (r["step"], r.get("split", "train"))
        assert key not in out, f"duplicate metrics record {key} in {run}"
        out[key] = r
    return out


def assert_same_metrics(a: Path, b: Path) -> None:
    ra, rb = metric_records(a), metric_records(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k].keys() == rb[k].keys(), k
        for name, va in ra[k].items():
            vb = rb[k][name]
            if isinstance(va, float):
                assert vb == pytest.approx(va, rel=1e-5, abs=1e-5), (k, name)
            else:
                assert va == vb, (k, name)


def run_ok(argv, **kw):
    r = subprocess.run(argv, check=False, env=ENV, capture_output=True, text=True, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# ------------------------------------------------------------------------------------------ SIGKILL + resume
@pytest.mark.slow
def test_search_sigkill_resume(tiny_model_dir, glue_dir, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    full = subprocess.Popen(nasq_argv(*search_args(tiny_model_dir, glue_dir, a)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        steps = kill_after_checkpoint(nasq_argv(*search_args(tiny_model_dir, glue_dir, b)), b)
        assert steps and max(steps) < 40
        run_ok(nasq_argv(*search_args(tiny_model_dir, glue_dir, b), "--resume"), timeout=600)
        _, err = full.communicate(timeout=600)
        assert full.returncode == 0, err[-3000:]
    finally:
        if full.poll() is None:
            full.kill()
            full.wait()
    assert json.loads((b / "run.json").read_text())["status"] == "done"
    for name in ("alphas.safetensors", "scales.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_allclose(tb[k], ta[k], rtol=1e-6, atol=1e-6, err_msg=f"{name}:{k}")
    assert_same_metrics(a, b)
    assert len(metric_records(b)) == 40  # every step logged exactly once
    plans = []
    for run in (a, b):
        assert main(["finalize", str(run), "--out", str(run / "plan.json")]) == 0
        d = json.loads((run / "plan.json").read_text())
        prov = d.pop("provenance")
        assert prov["step"] == 40
        plans.append(d)
    assert plans[0] == plans[1]


@pytest.mark.slow
def test_finetune_sigkill_resume(tiny_model_dir, glue_dir, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    full = subprocess.Popen(nasq_argv(*finetune_args(tiny_model_dir, glue_dir, a)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        kill_after_checkpoint(nasq_argv(*finetune_args(tiny_model_dir, glue_dir, b)), b)
        run_ok(nasq_argv(*finetune_args(tiny_model_dir, glue_dir, b), "--resume"), timeout=600)
        _, err = full.communicate(timeout=600)
        assert full.returncode == 0, err[-3000:]
    finally:
        if full.poll() is None:
            full.kill()
            full.wait()
    assert_same_metrics(a, b)
    wa, wb = (load_file(str(r / "model" / "state.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-6, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------------------- NaN / Inf
def restore_raw(run: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    m = ocp.CheckpointManager((run / "checkpoints").resolve(),
                              options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False))
    r = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    assert r["meta"]["step"] == step
    return dict(r["state"])


@pytest.fixture(scope="module")
def blown_up(tiny_model_dir, glue_dir, tmp_path_factory):
    """A finetune with lr=1e6 (non-finite after a few steps): (run dir, completed process)."""
    run = tmp_path_factory.mktemp("nan") / "run"
    argv = nasq_argv("finetune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", glue_dir,
                     "--train-subset", "200", "--max-steps", "30", "--set", "train.lr=1e6",
                     "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", *SMALL, "--out", run)
    return run, subprocess.run(argv, check=False, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nonfinite_loss_stops_with_good_checkpoint(blown_up):
    run, r = blown_up
    assert r.returncode == 2, r.stderr[-2000:]
    m = re.search(r"error: step (\d+): non-finite (\w+)=(nan|inf|-inf)", r.stderr)
    assert m, r.stderr
    bad_step = int(m.group(1))
    assert "Traceback" not in r.stderr and "--resume" in r.stderr
    steps = checkpoint_steps(run)
    assert steps and max(steps) < bad_step
    state = restore_raw(run, max(steps))  # the last good checkpoint restores, and holds finite numbers
    assert state and all(np.isfinite(np.asarray(v)).all() for v in state.values())
    logged = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) < bad_step  # the non-finite step is not recorded as a metric
    assert not (run / "model").exists()


@pytest.mark.slow
def test_resume_with_lower_lr_uses_it(blown_up, tiny_model_dir, glue_dir):
    """`--resume --set train.lr=...` after a blow-up: the new lr is recorded and every step logged after the
    resume ran with it. Whether the restored weights still recover after lr=1e6 is another matter (here they are
    finite but already diverged, so the run may stop again): it either finishes or stops with the same clean
    non-finite error, never anything else."""
    run, r = blown_up
    assert r.returncode == 2
    resumed_from = max(checkpoint_steps(run))
    rr = subprocess.run(nasq_argv("finetune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", glue_dir,
                                  "--train-subset", "200", "--max-steps", "30", "--set", "train.lr=1e-5",
                                  "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", *SMALL,
                                  "--out", run, "--resume"),
                        check=False, env=ENV, capture_output=True, text=True, timeout=600)
    info = json.loads((Path(run) / "run.json").read_text())
    assert info["resume_overrides"][-1]["train.lr"] == [1e6, 1e-5], info
    assert "lr: 1.0e-05" in (Path(run) / "config.yaml").read_text()
    after = [m for m in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
             if "lr" in m and m["step"] > resumed_from]
    assert all(m["lr"] <= 1e-5 for m in after), after
    if rr.returncode == 0:
        assert info["status"] == "done" and after, rr.stderr[-2000:]
    else:
        assert rr.returncode == 2 and re.search(r"error: step \d+: non-finite", rr.stderr), rr.stderr[-2000:]
        assert "Traceback" not in rr.stderr


# ------------------------------------------------------------------------------------- overwrite / atomicity
def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture
def existing(tmp_path):
    d = tmp_path / "existing"
    (d / "sub").mkdir(parents=True)
    (d / "keep.txt").write_text("precious")
    (d / "sub" / "x.bin").write_bytes(b"\x00\x01")
    return d


def _common(tiny_model_dir, glue_dir):
    return ["--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(glue_dir), "--train-subset", "100",
            "--max-steps", "2", *SMALL]


def test_finetune_refuses_existing(existing, tiny_model_dir, glue_dir, capsys):
    before = snapshot(existing)
    assert main(["finetune", *_common(tiny_model_dir, glue_dir), "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert snapshot(existing) == before


def test_search_refuses_existing(existing, tiny_model_dir, glue_dir, capsys):
    before = snapshot(existing)
    assert main(["search", *_common(tiny_model_dir, glue_dir), "--space", "tiny", "--avg-bits", "3",
                 "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert str(existing) in err and "--overwrite" in err
    assert snapshot(existing) == before


def test_export_refuses_existing(existing, tmp_path, capsys):
    src = tmp_path / "qat"
    src.mkdir()
    (src / "plan.json").write_text("{}")
    before = snapshot(existing)
    assert main(["export", str(src), "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert str(existing) in err and "--overwrite" in err
    assert snapshot(existing) == before


def test_finalize_refuses_existing(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text('{"mine": true}')
    before = snapshot(tmp_path)
    assert main(["finalize", str(tmp_path / "norun"), "--out", str(plan)]) == 2
    err = capsys.readouterr().err
    assert "plan.json" in err and "--overwrite" in err
    assert snapshot(tmp_path) == before


def test_write_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    from nasq.io import write_atomic

    p = tmp_path / "f.json"
    write_atomic(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(p, "new")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


# ------------------------------------------------------------------------------------- validation messages
def test_unknown_config_key(tmp_path, tiny_model_dir, glue_dir, capsys):
    cfg = tmp_path / "mycfg.yaml"
    cfg.write_text("train:\n  lrr: 0.1\n")
    out = tmp_path / "run"
    assert main(["finetune", *_common(tiny_model_dir, glue_dir), "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mycfg.yaml" in err and "train.lrr" in err and "unknown key" in err
    assert not out.exists()


@pytest.mark.parametrize("item,needle", [("train.lr", "expected KEY=VALUE"),
                                         ("train.nope=1", "--set: train.nope: unknown key"),
                                         ("train.lr=abc", "train.lr")])
def test_bad_set(item, needle, tmp_path, tiny_model_dir, glue_dir, capsys):
    out = tmp_path / "run"
    assert main(["finetune", *_common(tiny_model_dir, glue_dir), "--set", item, "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unknown_task(tmp_path, tiny_model_dir, glue_dir, capsys):
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--task", "sst3", "--data-dir", str(glue_dir), "--max-steps", "2"]
    assert main(["search", *args, "--space", "tiny", "--avg-bits", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'sst3'" in err and "sst2" in err
    assert not out.exists()
    assert main(["finetune", *args, "--out", str(out)]) == 2
    assert "'sst3'" in capsys.readouterr().err


def test_finetune_validates_before_creating_run_dir(tmp_path, tiny_model_dir, glue_dir):
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(tiny_model_dir), "--task", "sst3", "--data-dir", str(glue_dir),
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_missing_data_dir(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    assert main(["search", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(tmp_path / "nope"),
                 "--space", "tiny", "--avg-bits", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "--data-dir" in err
    assert not out.exists()


@pytest.mark.parametrize("text,needle", [
    ("rules: [\n", "not valid YAML"),
    ("name: x\nrules:\n  - name: a\n    patterns: ['encoder.*']\n    groups: 4\n    choices: [0, 9]\n",
     "rules[0].choices"),
    ("name: x\nrulez: []\n", "rulez"),
])
def test_malformed_space(text, needle, tmp_path, tiny_model_dir, glue_dir, capsys):
    space = tmp_path / "myspace.yaml"
    space.write_text(text)
    out = tmp_path / "run"
    assert main(["search", *_common(tiny_model_dir, glue_dir), "--space", str(space), "--avg-bits", "3",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "myspace.yaml" in err and needle in err
    assert not out.exists()


def test_infeasible_budget(tmp_path, tiny_model_dir, glue_dir, capsys):
    space = tmp_path / "nozero.yaml"
    space.write_text("name: nozero\nrules:\n  - name: all\n    patterns: ['encoder.layer.*.*.dense']\n"
                     "    groups: 4\n    choices: [2, 4, 8]\n")
    out = tmp_path / "run"
    for budget in (["--avg-bits", "0.01"], ["--budget-mb", "100"]):
        assert main(["search", *_common(tiny_model_dir, glue_dir), "--space", str(space), *budget,
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "outside the reachable range" in err and re.search(r"average 2\.\d+ \.\. 8\.00 bits", err), err
        assert not out.exists()


def test_plan_for_another_model(tmp_path, tiny_model_dir, glue_dir, capsys):
    from nasq.contract.plan import make_plan
    from nasq.contract.space import load_space, resolve
    from nasq.models.loading import load_pretrained
    from nasq.models.surgery import linear_shapes, model_param_shapes
    from nasq.testing import make_tiny_checkpoint

    other_dir = make_tiny_checkpoint(tmp_path / "other", intermediate_size=48)
    other, _, _ = load_pretrained(other_dir, 2)
    space = load_space("tiny")
    tensors = resolve(space, linear_shapes(other.bert), other.config.num_attention_heads)
    plan = make_plan(tensors, [(4,) * t.num_groups for t in tensors], space=space, budget=None,
                     param_shapes=model_param_shapes(other), provenance={"method": "uniform"})
    pfile = plan.save(tmp_path / "other_plan.json")
    assert main(["finetune", *_common(tiny_model_dir, glue_dir), "--plan", str(pfile),
                 "--out", str(tmp_path / "qat")]) == 2
    err = capsys.readouterr().err
    assert "other_plan.json was made for another model" in err
    assert "intermediate.dense: plan has linear 48x32, model has linear 64x32" in err


def test_resume_non_run_dir(tmp_path, tiny_model_dir, glue_dir, capsys):
    d = tmp_path / "notarun"
    d.mkdir()
    (d / "x.txt").write_text("x")
    assert main(["finetune", *_common(tiny_model_dir, glue_dir), "--out", str(d), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "not a nasq run directory" in err
    assert main(["finetune", *_common(tiny_model_dir, glue_dir), "--out", str(tmp_path / "missing"),
                 "--resume"]) == 2
    assert "not a nasq run directory" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["x.txt"]


def test_cli_output_has_no_pytorch_advice():
    """Without torch, importing transformers advises "PyTorch was not found"; the CLI must not print it."""
    code = "import sys; sys.modules['torch'] = None\nimport nasq.cli, transformers\nprint('ok')"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "PyTorch was not found" not in r.stderr
