"""`nasq bench {train-step, search-step, infer}`: timing *ratios* measured side by side in one process.

Absolute times on a shared 2-core machine are noisy; ratios of medians taken in the same process, on the same
batch, interleaved round-robin, are what we report. Each result is printed as JSON (and appended to `--out`
when given) with the machine, date and command.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.config import Config
from nasq.data.batching import Batch
from nasq.errors import NasqError


def fixed_batch(batch_size: int, seq_len: int, vocab: int, num_labels: int, seed: int = 0) -> Batch:
    """A full (no padding) batch of random in-vocabulary tokens: timing does not depend on the text."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (batch_size, seq_len), dtype=np.int32)
    ids[:, 0] = 101
    return Batch(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
                 labels=rng.integers(0, max(num_labels, 2), batch_size).astype(np.int32),
                 weights=np.ones(batch_size, np.float32), index=np.arange(batch_size, dtype=np.int32))


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


def time_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each zero-arg fn, calls interleaved round-robin (fair under noise)."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            _block(fn())
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def median_ms(fn, *args, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn(*args)` (blocked until ready) over `repeats` calls after `warmup`."""
    return 1e3 * time_interleaved({"fn": lambda: fn(*args)}, repeats, warmup)["fn"]


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "command": " ".join(["nasq", *sys.argv[1:]])}


def _fp32_train_step(model, cfg: Config, batch: Batch):
    import optax

    from nasq.train.finetune import make_train_step

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    step = make_train_step(graphdef, rest, tx, is_regression=False, kd_beta=0.0, kd_temperature=1.0)
    key = jax.random.key(0)
    return lambda: step(params, opt, batch, key, None)


def bench_train_step(cfg: Config, batch_size: int, seq_len: int, repeats: int) -> dict:
    from nasq.models.loading import load_pretrained

    model, mcfg, _ = load_pretrained(cfg.model.name, 2)
    batch = fixed_batch(batch_size, seq_len, mcfg.vocab_size, 2)
    t = time_interleaved({"fp32_train_step": _fp32_train_step(model, cfg, batch)}, repeats)
    return {"bench": "train-step", "model": cfg.model.name, "batch": batch_size, "seq": seq_len,
            "fp32_train_step_s": t["fp32_train_step"]}


def bench_search_step(cfg: Config, batch_size: int, seq_len: int, repeats: int) -> dict:
    """fp32 fine-tune step vs supernet weight step, bi-level (weight + gate) step and single-level step."""
    from nasq.models.loading import load_pretrained
    from nasq.quant.layers import GateLogits, set_search_context, to_supernet
    from nasq.search.loop import build_steps, make_problem, normalised_costs, search_optimizers
    from nasq.search.space import load_space

    if cfg.search.budget_mb is None and cfg.search.avg_bits is None and cfg.search.ratio is None:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"avg_bits": 2.0})})
    model, mcfg, _ = load_pretrained(cfg.model.name, 2)
    batch = fixed_batch(batch_size, seq_len, mcfg.vocab_size, 2)
    problem = make_problem(cfg, model)
    space = load_space(cfg.search.space)
    sn = to_supernet(model, problem.tensors, mode=space.quant_mode,
                     costs=normalised_costs(problem.cost_tables, problem.cost_budget))
    graphdef, weights, gates, rest = nnx.split(sn, nnx.Param, GateLogits, ...)
    w_tx, g_tx = search_optimizers(cfg, 1000)
    weight_step, gate_step, single_step, single_tx, _, price = build_steps(
        graphdef, rest, problem, w_tx, g_tx, is_regression=False, kd_beta=0.0, kd_temperature=1.0,
        mode="bilevel")
    ctx = set_search_context(rest, 1.0, jax.random.key(1), False)
    w_opt, g_opt, s_opt = w_tx.init(weights), g_tx.init(gates), single_tx.init((weights, gates))
    key, tau = jax.random.key(0), jnp.float32(1.0)

    def bilevel():  # what one search iteration costs: budget price + weight step + gate step
        mu = price(weights, gates, ctx, tau)
        c = set_search_context(rest, tau, key, False, mu)
        w, _wo, _ = weight_step(weights, gates, w_opt, c, batch, key, None)
        return gate_step(w, gates, g_opt, c, batch, key, tau)

    fns = {
        "fp32_step": _fp32_train_step(model, cfg, batch),
        "supernet_weight_step": lambda: weight_step(weights, gates, w_opt, ctx, batch, key, None),
        "bilevel_step": bilevel,
        "single_level_step": lambda: single_step(weights, gates, s_opt, ctx, batch, key, None, tau),
    }
    t = time_interleaved(fns, repeats)
    base = t["fp32_step"]
    return {"bench": "search-step", "model": cfg.model.name, "space": cfg.search.space, "batch": batch_size,
            "seq": seq_len, "groups": sum(x.num_groups for x in problem.tensors),
            **{f"{k}_s": v for k, v in t.items()},
            "weight_step_vs_fp32": t["supernet_weight_step"] / base, "bilevel_vs_fp32": t["bilevel_step"] / base,
            "single_level_vs_fp32": t["single_level_step"] / base}


def main(what: str, cfg: Config, args) -> int:
    if what == "train-step":
        res = bench_train_step(cfg, args.batch_size, args.seq_len, args.repeats)
    elif what == "search-step":
        res = bench_search_step(cfg, args.batch_size, args.seq_len, args.repeats)
    elif what == "infer":
        if not args.artifact:
            raise NasqError("bench infer needs --artifact model.nasq (and --teacher RUN for the fp32 baseline).")
        from nasq.export.artifact import bench_infer

        res = bench_infer(args.artifact, getattr(args, "teacher", None), args.batch_size, args.seq_len,
                          args.repeats)
    else:  # argparse restricts choices
        raise NasqError(f"unknown benchmark {what!r}")
    res = {**res, **environment()}
    line = json.dumps(res)
    print(line)
    if args.out:
        with open(Path(args.out), "a") as f:
            f.write(line + "\n")
    return 0
