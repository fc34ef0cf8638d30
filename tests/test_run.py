"""The training-loop skeleton shared by fine-tuning, QAT and the search (`nasq.run.train_loop`): cadence order,
the finiteness check before any checkpoint of a bad state, and resume from the checkpoint it wrote."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from nasq.config import Config
from nasq.errors import NasqError
from nasq.run import Cadence, RunDir, resume_state, train_loop


def _batches(start: int, total: int):
    return ((s, s // 4, s) for s in range(start, total + 3))  # more batches than steps: the loop must stop


def _run(path, *, total=6, start=0, state=None, bad_at=None, resume=False):
    run = RunDir(path, kind="finetune", config=Config(), resume=resume, overwrite=False)
    events: list[tuple] = []
    state = state or {"w.": {"x": jnp.zeros(3)}, "opt.": {"n": jnp.zeros((), jnp.int32)}}
    if resume:
        state, start = resume_state(run, state, total, log=lambda *_: None)

    def step_fn(st, step, batch):
        events.append(("step", step))
        loss = jnp.float32(np.nan if step == bad_at else 1.0 / (step + 1))
        return {"w.": {"x": st["w."]["x"] + batch}, "opt.": {"n": st["opt."]["n"] + 1}}, {"loss": loss}

    def record(st, done, m):
        events.append(("log", done))
        return {"lr": 0.1, **m}, {"loss": m["loss"]}

    out = train_loop(run, state, _batches(start, total), step_fn, total=total, start=start, desc="t", record=record,
                     cadence=Cadence(total, log_every=2, checkpoint_every=3, eval_every=2, last_checkpoint=start),
                     evaluate=lambda st: events.append(("eval",)) or {"accuracy": 1.0},
                     on_checkpoint=lambda st, done: events.append(("ckpt", done)))
    return run, out, events


def test_cadence_order_and_records(tmp_path):
    run, (state, wall), events = _run(tmp_path / "r")
    assert [e for e in events if e[0] != "step"] == [
        ("log", 2), ("eval",), ("log", 3), ("ckpt", 3), ("log", 4), ("eval",), ("log", 6)]
    assert [e[1] for e in events if e[0] == "step"] == list(range(6))  # stops at `total`
    assert float(state["w."]["x"][0]) == sum(range(6)) and int(state["opt."]["n"]) == 6 and wall >= 0
    recs = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "split" not in r]
    assert [r["step"] for r in train] == [2, 3, 4, 6]
    assert train[0]["epoch"] == 0 and train[0]["lr"] == 0.1 and train[0]["loss"] == pytest.approx(0.5)
    assert [r["step"] for r in recs if r.get("split") == "dev"] == [2, 4]
    assert run.latest_step() == 3  # the caller saves the last step


def test_resume_continues_from_the_checkpoint(tmp_path):
    _run(tmp_path / "r")
    run, (state, _), events = _run(tmp_path / "r", resume=True)
    assert [e[1] for e in events if e[0] == "step"] == [3, 4, 5]
    assert float(state["w."]["x"][0]) == sum(range(6)) and int(state["opt."]["n"]) == 6
    steps = [json.loads(x)["step"] for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 2, 3, 4, 4, 6]  # records after the checkpoint (step 3) were dropped, then re-logged


def test_non_finite_stops_before_the_checkpoint(tmp_path):
    with pytest.raises(NasqError, match=r"step 3: non-finite loss=nan"):
        _run(tmp_path / "r", bad_at=2)
    run = RunDir(tmp_path / "r", kind="finetune", config=Config(), resume=True, overwrite=False)
    assert run.latest_step() is None  # the bad state at step 3 was never checkpointed
