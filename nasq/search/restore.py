"""A finished search run's trained state, restored from its last checkpoint.

The search (:mod:`nasq.search.loop`) trains three things together: the weights, one LSQ step per
(row group, width) and the gate logits. Two views of that state:

* :func:`restore_supernet`: the trained supernet, its context at the final temperature ``tau_end`` and the
  final budget price: the network whose gates finalize reads. Comparing its dev metric with that of its
  discrete child measures the *discretization gap* (``experiments/discretization_gap.py``).
* :func:`inherit_search_weights`: the plan's discrete child with the search's weights. Every parameter of the
  plain model takes the checkpoint's value, and each planned group of a searched tensor gets the search's step
  ``s_{g,c}`` of the width ``c`` the plan gives it. ``nasq finetune --plan P --init-from SEARCH`` starts QAT
  from this instead of from the teacher's weights with MSE-initialised steps.

Both refuse a run that is not finished (``run.json`` status ``done``): an unfinished run's checkpoint and its
``search_result.json`` may be from different steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nasq.config import load_config
from nasq.contract.plan import Plan
from nasq.contract.search_result import SearchResult
from nasq.errors import NasqError
from nasq.quant.apply import apply_plan
from nasq.quant.layers import GateLogits, set_search_context
from nasq.run import RunDir
from nasq.search.loop import make_problem, supernet_of
from nasq.tree import flatten, unflatten_like

_SCALES = ".scales"


def _restore(run: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(last checkpoint as flat arrays, run.json) of a finished search run; clear errors for anything else."""
    path = Path(run)
    info_path = path / "run.json"
    if not info_path.is_file():
        raise NasqError(f"{path} is not a nasq search run ({info_path} not found); pass the directory "
                        "`nasq search --out` wrote.")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NasqError(f"cannot read {info_path}: {e}") from None
    if info.get("kind") != "search":
        raise NasqError(f"{path} is a {info.get('kind')} run, not a search run.")
    if info.get("status") != "done":
        raise NasqError(f"search run {path} is not finished (status {info.get('status')!r}); resume it with "
                        f"`nasq search --resume --out {path}` first.")
    flat, _meta = RunDir(path, kind="search", config=None, resume=True, overwrite=False).restore_checkpoint(None)
    return flat, info


def search_checkpoint(run: str | Path) -> dict[str, np.ndarray]:
    """The last checkpoint of a finished search run: flat ``{"w.<param>" | "g.<gate>" | "opt.<...>": array}``."""
    return _restore(run)[0]


def search_steps(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{plan path: [G, C] steps}`` of every gated tensor in a search checkpoint."""
    return {k[2:-len(_SCALES)].removeprefix("bert."): np.asarray(v) for k, v in flat.items()
            if k.startswith("w.") and k.endswith(_SCALES)}


def load_search_weights(model: nnx.Module, flat: dict[str, np.ndarray], source: str) -> nnx.Module:
    """A copy of the plain (unquantized) ``model`` with every parameter from the search checkpoint ``flat``."""
    model = nnx.clone(model)
    params = nnx.state(model, nnx.Param)
    mine = flatten(params, "w.")
    for k, v in mine.items():
        if k not in flat:
            raise NasqError(f"search run {source} has no parameter {k[2:]}: it searched a different model.")
        if tuple(np.shape(flat[k])) != tuple(np.shape(v)):
            raise NasqError(f"search run {source}: parameter {k[2:]} has shape {tuple(np.shape(flat[k]))}, the "
                            f"model has {tuple(np.shape(v))}: it searched a different model.")
    nnx.update(model, unflatten_like(params, flat, "w."))
    return model


def inherit_search_weights(run: str | Path, plan: Plan, model: nnx.Module) -> nnx.Module:
    """``plan`` applied to the search run's trained weights, with the search's step of each planned width.

    ``model`` is the plain model the search started from (its teacher); only its structure and unsearched
    buffers are used. The plan's tensors must be tensors of the search with the same row groups, and each
    planned width must be one of the search's choices for it (true for every plan ``nasq finalize`` writes for
    this run; a baseline plan over the same search space qualifies too).
    """
    flat = search_checkpoint(run)  # checks the run first: a clear error for a wrong or unfinished directory
    tensors = list(SearchResult.load(run)[0].tensors)
    steps = search_steps(flat)
    by_path = {t.path: t for t in tensors}
    scales = {}
    for t in plan.tensors:
        st = by_path.get(t.path)
        if st is None or t.path not in steps:
            raise NasqError(f"plan {plan.source}: tensor {t.path} was not searched by {run}; --init-from needs "
                            "the search run the plan was finalized from (or one over the same space).")
        if tuple(t.group_sizes) != tuple(st.group_sizes):
            raise NasqError(f"plan {plan.source}: tensor {t.path} has {t.num_groups} row groups, search run "
                            f"{run} has {len(st.group_sizes)}: the plan is from another search space.")
        bad = sorted(set(t.bits) - set(st.choices) - {0})
        if bad:
            raise NasqError(f"plan {plan.source}: tensor {t.path} uses {bad} bits, which search run {run} did not "
                            f"train (its choices: {list(st.choices)}).")
        col = [st.choices.index(b) if b in st.choices else 0 for b in t.bits]
        s = steps[t.path][np.arange(t.num_groups), col]
        scales[t.path] = np.where(np.asarray(t.bits) == 0, 1.0, s).astype(np.float32)
    return apply_plan(load_search_weights(model, flat, str(run)), plan, scales)


def restore_supernet(run: str | Path, model: nnx.Module, tau: float | None = None) -> nnx.Module:
    """The trained supernet of a finished search run at temperature ``tau`` (default: the run's ``tau_end``)
    and its final price, without Gumbel noise.

    ``model``: the plain model the search started from (the run's teacher, ``kd.teacher`` of its config).
    """
    flat, info = _restore(run)
    cfg = load_config(Path(run) / "config.yaml")
    problem = make_problem(cfg, model)
    sn = supernet_of(cfg, model, problem)
    weights, gates = nnx.state(sn, nnx.Param), nnx.state(sn, GateLogits)
    nnx.update(sn, unflatten_like(weights, flat, "w."), unflatten_like(gates, flat, "g."))
    graphdef, state = nnx.split(sn)
    state = set_search_context(state, cfg.search.tau_end if tau is None else tau, jax.random.key(cfg.train.seed), False,
                               info.get("final_price", 0.0))
    return nnx.merge(graphdef, state)
