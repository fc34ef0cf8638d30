"""Run directories: config snapshot, orbax checkpoints, JSONL metrics, atomic writes, progress.

Layout of a run directory::

    RUN/config.yaml        the resolved config (snapshot; `--resume` reads it back)
    RUN/run.json           kind of run (finetune / qat / search), model dir, versions, status
    RUN/metrics.jsonl      one JSON object per logged step / eval
    RUN/checkpoints/N/     orbax checkpoints (latest kept + one before)
    RUN/model/             final weights (`weights.safetensors`) + config.json + tokenizer (finetune/qat)

Nothing is overwritten unless the user passes `--overwrite`; `--resume` continues from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from pydantic import ValidationError

from nasq.config import Config
from nasq.errors import NasqError, validation_problems
from nasq.io import check_output_path, mark_nasq_made, read_json, read_yaml, write_atomic
from nasq.tree import flatten, unflatten_like


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_run_config(run: str | Path) -> Config:
    """The validated config snapshot ``RUN/config.yaml`` of a run directory."""
    p = Path(run) / "config.yaml"
    try:
        return Config.model_validate(read_yaml(p, what="run config", max_bytes=2**24))
    except ValidationError as e:
        raise NasqError(f"{p}: not a valid nasq config: " + "; ".join(validation_problems(e)[:6])) from None


def run_finished(path: str | Path) -> bool:
    """True when ``path`` is a run directory whose ``run.json`` says ``status: done``."""
    p = Path(path) / "run.json"
    try:
        return p.is_file() and read_json(p, what="run info", max_bytes=2**24).get("status") == "done"
    except NasqError:
        return False


def _command_line() -> str:
    """How this process was started (``nasq finetune ...`` for the CLI), for a run's provenance (model cards)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("nasq", "cli.py"):
        argv[0] = "nasq"
    return shlex.join(argv)


class RunDir:
    """A run directory opened for a new run, an overwrite, or a resume."""

    def __init__(self, path: str | Path, *, kind: str, config: Config | None, resume: bool, overwrite: bool):
        self.path = Path(path)
        self.kind = kind
        if resume:
            if not (self.path / "config.yaml").is_file():
                raise NasqError(f"--resume: {self.path} is not a nasq run directory (no config.yaml).")
            info = self.info()
            if info.get("kind") != kind:
                raise NasqError(f"--resume: {self.path} is a {info.get('kind')!r} run, not {kind!r}.")
            saved = load_run_config(self.path)
            self.config = saved if config is None else config
            if config is not None and config != saved:  # e.g. a lower lr after a NaN: record what changed
                old, new = _flat(saved.model_dump(mode="json")), _flat(config.model_dump(mode="json"))
                changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
                write_atomic(self.path / "config.yaml", config.to_yaml())
                self.write_info(resume_overrides=[*info.get("resume_overrides", []), changed])
        else:
            if config is None:
                raise ValueError("config required for a new run")
            check_output_path(self.path, overwrite)  # --overwrite replaces only a directory nasq made
            if self.path.exists() and overwrite:
                shutil.rmtree(self.path) if self.path.is_dir() and not self.path.is_symlink() else self.path.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            mark_nasq_made(self.path, kind)
            self.config = config
            write_atomic(self.path / "config.yaml", config.to_yaml())
            self.write_info(kind=kind, status="running", created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                            command=_command_line())

    # -- run.json ---------------------------------------------------------------------------------
    def info(self) -> dict:
        p = self.path / "run.json"
        return read_json(p, what="run info", max_bytes=2**24, root=self.path) if p.is_file() else {}

    def write_info(self, **updates) -> None:
        info = {**self.info(), **updates}
        write_atomic(self.path / "run.json", json.dumps(info, indent=2))

    # -- metrics ----------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v) for k, v in record.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop records logged after the restored checkpoint (they will be logged again)."""
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return
        keep = []
        for ln in p.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:  # a line cut short by a kill mid-append
                continue
            if rec.get("step", 0) <= step:
                keep.append(ln)
        write_atomic(p, "".join(ln + "\n" for ln in keep))

    # -- checkpoints --------------------------------------------------------------------------------
    def _manager(self):
        import orbax.checkpoint as ocp

        if not hasattr(self, "_mngr"):
            self._mngr = ocp.CheckpointManager(
                (self.path / "checkpoints").resolve(),
                options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False),
            )
        return self._mngr

    def save_checkpoint(self, step: int, arrays: dict[str, Any], meta: dict) -> None:
        """`arrays`: flat {name: array}; `meta`: JSON-able (step, rng seed, controller state...)."""
        import orbax.checkpoint as ocp

        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        m = self._manager()
        m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
               force=True)
        m.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager().latest_step()

    def resume(self, like: dict[str, Any], total: int, log=print) -> tuple[dict | None, int]:
        """Continue from the latest checkpoint, if any: ``(flat arrays shaped like like, its step)``, metrics
        logged after it dropped; ``(None, 0)`` when the run has no checkpoint yet."""
        if self.latest_step() is None:
            return None, 0
        flat, meta = self.restore_checkpoint(like)
        start = int(meta["step"])
        self.truncate_metrics(start)
        log(f"resumed {self.path} at step {start}/{total}")
        return flat, start

    def restore_checkpoint(self, like: dict[str, Any] | None, step: int | None = None) -> tuple[dict, dict]:
        """(flat arrays, meta) of checkpoint ``step`` (default: the latest); ``like=None`` restores every array
        as saved (numpy), otherwise exactly the keys, shapes and dtypes of ``like``."""
        import orbax.checkpoint as ocp

        m = self._manager()
        step = m.latest_step() if step is None else step
        if step is None:
            raise NasqError(f"--resume: {self.path} has no checkpoint yet; start it again without --resume.")
        abstract = None if like is None else {k: np.asarray(v) for k, v in like.items()}
        try:
            r = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                         meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise NasqError(f"{self.path}/checkpoints/{step}: cannot restore checkpoint ({type(e).__name__}: {e}).") from None
        return dict(r["state"]), dict(r["meta"])


@dataclasses.dataclass
class Cadence:
    """When a training loop (fine-tuning, QAT, search) logs, evaluates and checkpoints, counted in finished steps.

    A checkpoint is due every ``checkpoint_every`` steps before the last (the last step always saves); a log
    record is due every ``log_every`` steps, at the last step and with every checkpoint (values are checked to be
    finite before a checkpoint is written); an intermediate dev evaluation every ``eval_every`` steps."""

    total: int
    log_every: int
    checkpoint_every: int
    eval_every: int | None = None
    last_checkpoint: int = 0

    def checkpoint_due(self, done: int) -> bool:
        return done - self.last_checkpoint >= self.checkpoint_every and done < self.total

    def log_due(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total or self.checkpoint_due(done)

    def eval_due(self, done: int) -> bool:
        return bool(self.eval_every) and done % self.eval_every == 0 and done < self.total


class Progress:
    """A tqdm bar with loss / size-vs-budget postfix and ETA; quiet when not a TTY and in CI logs it prints lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = ""):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0,
                        disable=os.environ.get("NASQ_NO_PROGRESS") == "1")

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def check_finite(step: int, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(float(v))}
    if bad:
        raise NasqError(
            f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopped. The last good "
            "checkpoint is kept: lower the learning rate and start again (--overwrite), or continue from the last checkpoint with --resume --set train.lr=..."
        )


# ---------------------------------------------------------------------------------------------------------------
# The training-loop skeleton shared by fine-tuning / QAT (`nasq.train.finetune`) and the search
# (`nasq.search.loop`): one resume, one log / eval / checkpoint cadence, one finiteness check, one progress bar.

TrainState = dict[str, Any]
"""What a loop checkpoints: ``{prefix: pytree}``, e.g. ``{"params.": params, "opt.": opt_state}``; every leaf is
saved under ``prefix + its flattened path`` (`nasq.tree.flatten`), so the prefixes name the checkpoint's keys."""


def state_arrays(state: TrainState) -> dict[str, Any]:
    """The flat ``{name: array}`` a checkpoint stores for ``state``."""
    return {k: v for prefix, tree in state.items() for k, v in flatten(tree, prefix).items()}


def resume_state(run: RunDir, state: TrainState, total: int, log=print) -> tuple[TrainState, int]:
    """``(state, step)`` from the run's latest checkpoint (same structure, shapes and dtypes as ``state``), or
    ``(state, 0)`` unchanged when it has none; metrics logged after that step are dropped."""
    flat, start = run.resume(state_arrays(state), total, log)
    if flat is None:
        return state, 0
    return {prefix: unflatten_like(tree, flat, prefix) for prefix, tree in state.items()}, start


def save_state(run: RunDir, state: TrainState, step: int) -> None:
    run.save_checkpoint(step, state_arrays(state), {"step": step})


def train_loop(run: RunDir, state: TrainState, batches: Iterable[tuple[int, int, Any]],
               step_fn: Callable[[TrainState, int, Any], tuple[TrainState, dict]], *, total: int, start: int,
               cadence: Cadence, desc: str,
               record: Callable[[TrainState, int, dict[str, float]], tuple[dict, dict]],
               evaluate: Callable[[TrainState], dict] | None = None,
               on_checkpoint: Callable[[TrainState, int], None] | None = None) -> tuple[TrainState, float]:
    """Run ``step_fn`` on ``batches`` (``(step, epoch, batch)``, from ``start``) up to ``total`` steps; returns
    the final state and the wall seconds. For every finished step ``done = step + 1``, in this order:

    * log (``cadence.log_due``): the step's metrics as floats go to ``record(state, done, metrics)``, which returns
      ``(fields, progress postfix)``; every numeric field must be finite (else `NasqError`, before any checkpoint
      of that state), and ``{"step", "epoch", **fields, "elapsed_s"}`` is appended to metrics.jsonl;
    * ``evaluate(state)`` every ``cadence.eval_every`` steps, logged as a ``"split": "dev"`` record;
    * checkpoint (``cadence.checkpoint_due``), then ``on_checkpoint(state, done)``.

    The caller saves the last step (it usually finalises the state first)."""
    bar = Progress(total, start, desc=desc)
    t0 = time.time()
    for step, epoch, batch in batches:
        if step >= total:
            break
        state, m = step_fn(state, step, batch)
        done = step + 1
        ckpt_due = cadence.checkpoint_due(done)
        if cadence.log_due(done):
            fields, postfix = record(state, done, {k: float(v) for k, v in m.items()})
            check_finite(done, **{k: v for k, v in fields.items() if isinstance(v, (int, float))})
            run.log({"step": done, "epoch": epoch, **fields, "elapsed_s": round(time.time() - t0, 2)})
            bar.update(done - bar.bar.n, **postfix)
        if evaluate is not None and cadence.eval_due(done):
            run.log({"step": done, "split": "dev", **evaluate(state)})
        if ckpt_due:
            save_state(run, state, done)
            if on_checkpoint is not None:
                on_checkpoint(state, done)
            cadence.last_checkpoint = done
    bar.close()
    return state, time.time() - t0
