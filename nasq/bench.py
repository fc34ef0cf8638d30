"""`nasq bench {train-step, search-step, infer}`: timing *ratios* measured side by side in one process.

Absolute times on a shared 2-core machine are noisy; ratios of medians taken in the same process, on the same
batch, interleaved round-robin, are what we report. Each result is printed as JSON (and appended to `--out`
when given) with the machine, date and command.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.config import Config
from nasq.contract.model_dir import load_model_dir
from nasq.contract.plan import Plan
from nasq.contract.space import load_space
from nasq.data.batching import Batch
from nasq.errors import NasqError
from nasq.export.reader import load_artifact
from nasq.kernels import native
from nasq.kernels.native import describe as describe_kernel
from nasq.kernels.native import resolve_kernel
from nasq.models.bert import BertForSequenceClassification, Embedding, Linear
from nasq.models.loading import load_pretrained
from nasq.models.surgery import replace_modules
from nasq.quant.layers import GateLogits, QuantEmbedding, QuantLinear, set_search_context, to_supernet
from nasq.search.loop import build_steps, make_problem, normalised_costs, search_iteration, search_optimizers
from nasq.timing import environment, time_interleaved
from nasq.train.finetune import make_train_step


def fixed_batch(batch_size: int, seq_len: int, vocab: int, num_labels: int, seed: int = 0) -> Batch:
    """A full (no padding) batch of random in-vocabulary tokens: timing does not depend on the text."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (batch_size, seq_len), dtype=np.int32)
    ids[:, 0] = 101
    return Batch(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
                 labels=rng.integers(0, max(num_labels, 2), batch_size).astype(np.int32),
                 weights=np.ones(batch_size, np.float32), index=np.arange(batch_size, dtype=np.int32))


def _fp32_train_step(model, cfg: Config, batch: Batch):
    import optax

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    step = make_train_step(graphdef, rest, tx, is_regression=False, kd_beta=0.0, kd_temperature=1.0)
    key = jax.random.key(0)
    return lambda: step(params, opt, batch, key, None)


def bench_train_step(cfg: Config, batch_size: int, seq_len: int, repeats: int) -> dict:
    model, mcfg, _ = load_pretrained(cfg.model.name, 2)
    batch = fixed_batch(batch_size, seq_len, mcfg.vocab_size, 2)
    t = time_interleaved({"fp32_train_step": _fp32_train_step(model, cfg, batch)}, repeats)
    return {"bench": "train-step", "model": cfg.model.name, "batch": batch_size, "seq": seq_len,
            "fp32_train_step_s": t["fp32_train_step"]}


def bench_search_step(cfg: Config, batch_size: int, seq_len: int, repeats: int) -> dict:
    """fp32 fine-tune step vs supernet weight step, bi-level (weight + gate) step and single-level step."""
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
    steps = build_steps(graphdef, rest, problem, w_tx, g_tx, is_regression=False, kd_beta=0.0, kd_temperature=1.0)
    ctx = set_search_context(rest, 1.0, jax.random.key(1), False)
    w_opt, g_opt, s_opt = w_tx.init(weights), g_tx.init(gates), steps.single_tx.init((weights, gates))
    key, tau = jax.random.key(0), jnp.float32(1.0)
    # what one search iteration costs (`search_iteration`): budget price + weight step + gate step
    every_step_gate = cfg.search.model_copy(update={"mode": "bilevel", "warmup_steps": 0, "gate_every": 1,
                                                    "gumbel": False})
    state = {"w.": weights, "g.": gates, "opt.": (w_opt, g_opt)}
    fns = {
        "fp32_step": _fp32_train_step(model, cfg, batch),
        "supernet_weight_step": lambda: steps.weight(weights, gates, w_opt, ctx, batch, key, None),
        "budget_price": lambda: steps.price(weights, gates, ctx, tau),
        "bilevel_step": lambda: search_iteration(steps, every_step_gate, state, 0, 1000, batch, batch, key, rest)[:2],
        "single_level_step": lambda: steps.single(weights, gates, s_opt, ctx, batch, key, None, tau),
    }
    t = time_interleaved(fns, repeats)
    base = t["fp32_step"]
    every = cfg.search.gate_every
    # one gate step per `every` weight steps: the price and the weight step run every step, the gate step (the
    # rest of a bi-level iteration) every `every`-th
    every_step = t["budget_price"] + t["supernet_weight_step"]
    amortized = every_step + max(t["bilevel_step"] - every_step, 0.0) / every
    return {"bench": "search-step", "model": cfg.model.name, "space": cfg.search.space, "batch": batch_size,
            "seq": seq_len, "groups": sum(x.num_groups for x in problem.tensors),
            **{f"{k}_s": v for k, v in t.items()},
            "weight_step_vs_fp32": t["supernet_weight_step"] / base, "bilevel_vs_fp32": t["bilevel_step"] / base,
            "gate_every": every, "search_iteration_vs_fp32": amortized / base,
            "single_level_vs_fp32": t["single_level_step"] / base}


def dequantized_fp32_model(model):
    """A plain fp32 BERT holding the (dequantized) weights of a fixed-plan model (for timing references)."""
    def fn(_, m):
        if isinstance(m, QuantLinear):
            new = Linear(m.in_features, m.out_features, rngs=nnx.Rngs(0))
            new.kernel = nnx.Param(jnp.asarray(m.quantized_weight()).T)
            new.bias = nnx.Param(m.bias[...] * jnp.asarray(m.rows_bits() > 0, jnp.float32))
            return new
        if isinstance(m, QuantEmbedding):
            new = Embedding(m.num_embeddings, m.features, rngs=nnx.Rngs(0))
            new.embedding = nnx.Param(jnp.asarray(m.quantized_weight()))
            return new
        return None

    return replace_modules(model, fn)


def external_forwards(artifact_path: str | Path, ids: np.ndarray, threads: int, tmp_dir: str | Path,
                      num_labels: int) -> tuple[dict, dict]:
    """What users run today, on the artifact's architecture, as zero-argument forwards of ``ids`` (full mask):

    ``torch_fp32_ms`` (transformers ``BertForSequenceClassification`` from the artifact's ``config.json``, random
    weights: a forward's time does not depend on them), ``torch_dyn_int8_ms`` (the same after
    ``torch.ao.quantization.quantize_dynamic``, int8 ``Linear``), ``ort_fp32_ms`` / ``ort_dyn_int8_ms`` (that
    model exported to ONNX, opset 17, and ONNX Runtime's ``quantize_dynamic`` of it, QInt8 weights) and
    ``ort_nasq_ms`` (ONNX Runtime on nasq's own ONNX export of the artifact). ``threads``: torch's and ONNX
    Runtime's intra-op threads. Returns ``(forwards, versions)``. Needs the ``parity`` (torch) and ``onnx``
    (onnx, onnxruntime) extras: bench-only, never the core's dependencies.

    Idle threads sleep: ONNX Runtime's ``session.intra_op.allow_spinning`` is 0 and ``OMP_WAIT_POLICY`` defaults
    to ``PASSIVE`` for PyTorch (read when torch is first imported), because in interleaved rounds a framework whose
    threads spin after its call takes the cores from the next variant (seen at 1 x 16 tokens: nasq's forward
    timed 2.5x slower right after ONNX Runtime's than alone).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import onnxruntime as ort
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from transformers import BertConfig as HfBertConfig
        from transformers import BertForSequenceClassification as HfBert
    except ImportError as e:
        raise NasqError(f"`bench infer --external` needs PyTorch and ONNX Runtime ({e.name} is missing): "
                        "pip install -e '.[parity,onnx]'") from None
    from nasq.export.onnx import export_onnx, load_onnx

    artifact_path, d = Path(artifact_path), Path(tmp_dir)
    torch.set_num_threads(threads)
    tm = HfBert(HfBertConfig.from_pretrained(str(artifact_path), num_labels=num_labels)).eval()
    tq = torch.ao.quantization.quantize_dynamic(tm, {torch.nn.Linear}, dtype=torch.qint8)
    t_ids = torch.tensor(ids, dtype=torch.long)
    t_am, t_tt = torch.ones_like(t_ids), torch.zeros_like(t_ids)

    def run_torch(model):
        with torch.inference_mode():
            return model(input_ids=t_ids, attention_mask=t_am, token_type_ids=t_tt).logits

    fns = {"torch_fp32_ms": lambda: run_torch(tm), "torch_dyn_int8_ms": lambda: run_torch(tq)}
    export_onnx(artifact_path, d / "nasq.onnx")
    om = load_onnx(d / "nasq.onnx", threads=threads, spinning=False)
    fns["ort_nasq_ms"] = lambda: om(ids, np.zeros_like(ids), np.ones_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(tm, (t_ids, t_am, t_tt), str(d / "fp32.onnx"), input_names=names, output_names=["logits"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}, opset_version=17, dynamo=False)
    root = logging.getLogger()  # onnxruntime's quantizer advises pre-processing on the root logger: not ours to show
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(d / "fp32.onnx"), str(d / "int8.onnx"), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64),
            "token_type_ids": np.zeros_like(ids, np.int64)}
    for name, f in (("ort_fp32_ms", "fp32.onnx"), ("ort_dyn_int8_ms", "int8.onnx")):
        sess = ort.InferenceSession(str(d / f), opts, providers=["CPUExecutionProvider"])
        fns[name] = lambda sess=sess: sess.run(None, feed)[0]
    return fns, {"torch": torch.__version__, "onnxruntime": ort.__version__,
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "ort_allow_spinning": 0}


def bench_infer(artifact_path: str | Path, fp32_model_dir_or_run: str | Path | None, batch: int, seq: int,
                repeats: int = 10, seed: int = 0, compare: Sequence[str | Path] = (), external: bool = False,
                threads: int | None = None) -> dict:
    """Median ms of the integer model (every unpack mode) vs the jitted fp32 forward, one process.

    The fp32 reference is the model at ``fp32_model_dir_or_run`` (a QAT run's weights are dequantized into
    plain fp32 ``Linear``/``Embedding``); None: the artifact's architecture with random weights (the time of a
    forward does not depend on the values; ``res["fp32_weights"]`` says which). Returns ``{int_fused_ms, int_load_ms, fp32_ms, ratio_fused,
    ratio_load, batch, seq, repeats, kernel}`` with ``ratio = int_ms / fp32_ms`` (< 1: int path faster) and
    ``kernel`` the integer GEMM used (``nasq.kernels.native.describe()``); with ``panels`` too where the native
    kernel runs. ``compare``: more artifacts of the same model (e.g. other plans), timed in the same interleaved
    rounds on the default path (``unpack="auto"``); ``res["compare"]`` lists each one's ``ms``, its plan's
    ``avg_bits`` and ``vs_first`` = its ms / the first artifact's on the same path.

    Where the native kernel runs, ``int_xla_ms`` is the same artifact on the XLA integer path (``kernel="xla"``)
    and ``int_panels_xla_attention_ms`` the default path with XLA's attention core. ``external``: PyTorch and ONNX
    Runtime in the same interleaved rounds (:func:`external_forwards`, ``threads`` theirs, default the native
    kernel's or 2); every ``*_ms`` also gets ``ratio_*`` against ``fp32_ms``.
    """
    if threads is not None and threads < 1:
        raise NasqError(f"--threads must be >= 1, got {threads}")
    rng = np.random.default_rng(seed)
    if fp32_model_dir_or_run is None:
        first = load_artifact(artifact_path)
        fp_model = BertForSequenceClassification(first.config, first.num_labels, rngs=nnx.Rngs(seed))
    else:
        fp_model = dequantized_fp32_model(load_model_dir(fp32_model_dir_or_run)[0])
    vocab = fp_model.config.vocab_size
    ids = jnp.asarray(rng.integers(1000, min(vocab, 30000), (batch, seq)), jnp.int32)
    tt = jnp.zeros_like(ids)
    am = jnp.ones_like(ids)
    res: dict[str, Any] = {"batch": batch, "seq": seq, "repeats": repeats,
                           "fp32_weights": "random" if fp32_model_dir_or_run is None else str(fp32_model_dir_or_run)}
    fns = {}
    modes = ("fused", "load", "panels") if resolve_kernel() == "native" else ("fused", "load")
    models = {mode: load_artifact(artifact_path, unpack=mode) for mode in modes}
    for mode, m in models.items():
        fns[f"int_{mode}_ms"] = lambda m=m: m(ids, tt, am)
    if "panels" in modes:  # the loaded models with the XLA GEMM / XLA attention core (same weights)
        mf, m = models["fused"], models["panels"]
        mx = type(mf)(replace(mf.meta, kernel="xla"), mf.params)
        ma = type(m)(replace(m.meta, attention="xla"), m.params)
        fns["int_xla_ms"] = lambda: mx(ids, tt, am)
        fns["int_panels_xla_attention_ms"] = lambda: ma(ids, tt, am)
    default_mode = None  # what unpack="auto" resolves to here (the compared artifacts' path)
    for i, other in enumerate(compare):
        m = load_artifact(other)
        default_mode = m.meta.unpack
        fns[f"compare{i}_ms"] = lambda m=m: m(ids, tt, am)
    graphdef, state = nnx.split(fp_model)
    fwd = jax.jit(lambda s, a, b, c: nnx.merge(graphdef, s)(a, b, c))
    fns["fp32_ms"] = lambda: fwd(state, ids, tt, am)
    with tempfile.TemporaryDirectory(prefix="nasq-bench-") as tmp:
        if external:
            n = threads or (native.num_threads() if resolve_kernel() == "native" else 2)
            more, versions = external_forwards(artifact_path, np.asarray(ids), n, tmp, models["fused"].num_labels)
            fns.update(more)
            res.update({"external_threads": n, **versions})
        # medians of calls interleaved round-robin, so machine noise hits every variant alike
        res.update({k: 1e3 * v for k, v in time_interleaved(fns, repeats).items()})
    for mode in modes:
        res[f"ratio_{mode}"] = res[f"int_{mode}_ms"] / res["fp32_ms"]
    for k in fns:
        if k.endswith("_ms") and not k.startswith(("int_fused", "int_load", "int_panels_ms", "compare", "fp32")):
            res[f"ratio_{k[:-3]}"] = res[k] / res["fp32_ms"]
    if compare:
        first = res[f"int_{default_mode}_ms"]  # the first artifact on the same path
        res["avg_bits"] = Plan.load(Path(artifact_path) / "plan.json").totals["avg_bits"]
        res["compare"] = []
        for i, p in enumerate(compare):
            ms = res.pop(f"compare{i}_ms")
            res["compare"].append({"artifact": str(p), "avg_bits": Plan.load(Path(p) / "plan.json").totals["avg_bits"],
                                   "ms": ms, "vs_first": ms / first})
    res["kernel"] = describe_kernel()  # which integer GEMM ran (native C++ or XLA) and why
    return res


def main(what: str, cfg: Config, args) -> int:
    if what == "train-step":
        res = bench_train_step(cfg, args.batch_size, args.seq_len, args.repeats)
    elif what == "search-step":
        res = bench_search_step(cfg, args.batch_size, args.seq_len, args.repeats)
    elif what == "infer":
        if not args.artifact:
            raise NasqError("bench infer needs --artifact model.nasq (and optionally --teacher RUN: the fp32 "
                            "baseline's weights; without it, the same architecture with random weights).")
        res = bench_infer(args.artifact[0], getattr(args, "teacher", None), args.batch_size, args.seq_len,
                          args.repeats, compare=args.artifact[1:], external=getattr(args, "external", False),
                          threads=getattr(args, "threads", None))
    else:  # argparse restricts choices
        raise NasqError(f"unknown benchmark {what!r}")
    res = {**res, **environment()}
    line = json.dumps(res)
    print(line)
    if args.out:
        with open(Path(args.out), "a") as f:
            f.write(line + "\n")
    return 0
