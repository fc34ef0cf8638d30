"""`nasq` command line: a thin layer over the library (see `nasq --help`).

Every command shares the flags of `add_common`; their values land in the one typed `Config`
(precedence: defaults < preset < --config FILE < flags < --set). User errors exit 2 with a one-paragraph
message and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nasq.errors import NasqError


def add_common(p: argparse.ArgumentParser, *, out: bool = True) -> None:
    g = p.add_argument_group("shared")
    g.add_argument("--model", help="alias (minilm-l6), local model dir, or hub id")
    g.add_argument("--task", help="GLUE task: sst2, mrpc, cola, stsb, qqp, mnli, qnli, rte, wnli")
    g.add_argument("--data-dir", help="local GLUE directory (standard layout), e.g. ../shared/data/glue")
    if out:
        g.add_argument("--out", help="output run directory / file")
    g.add_argument("--config", help="YAML config file")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-4 (repeatable)")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--train-subset", type=int, help="use N (seeded) train rows")
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d = p.add_argument_group("parallel (docs/SCALING.md)")
    d.add_argument("--data-parallel", help="devices on the data axis: N or 'all' (default 1)")
    d.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="matmul precision (default float32)")
    d.add_argument("--coordinator-address", help="multi-host: HOST:PORT of process 0 (jax.distributed)")
    d.add_argument("--num-processes", type=int, help="multi-host: number of processes (hosts)")
    d.add_argument("--process-id", type=int, help="multi-host: this process's id, 0..num_processes-1")


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (exactly one)")
    g.add_argument("--budget-mb", type=float, help="size budget in MB (10^6 bytes)")
    g.add_argument("--avg-bits", type=float, help="size of every searched weight at this many bits")
    g.add_argument("--ratio", type=float, help="compression ratio vs fp32 of the searched tensors")
    g.add_argument("--latency-ms", type=float, help="latency budget (needs a `nasq profile` table)")
    g.add_argument("--convention", choices=["encoder", "artifact"],
                   help="budget covers searched encoder tensors only, or the whole artifact")
    g.add_argument("--space", help="search space name (search_spaces/) or YAML path")


def config_from_args(args: argparse.Namespace, preset: dict | None = None):
    from nasq.config import build_config, load_yaml, parse_set

    layers = [("preset", preset or {})]
    if getattr(args, "config", None):
        layers.append((args.config, load_yaml(args.config)))
    flags: dict = {}

    def put(section, key, value):
        if value is not None:
            flags.setdefault(section, {})[key] = value

    put("model", "name", getattr(args, "model", None))
    put("data", "task", getattr(args, "task", None))
    put("data", "data_dir", getattr(args, "data_dir", None))
    put("data", "train_subset", getattr(args, "train_subset", None))
    put("train", "max_steps", getattr(args, "max_steps", None))
    put("train", "seed", getattr(args, "seed", None))
    for k in ("budget_mb", "avg_bits", "ratio", "latency_ms", "convention", "space"):
        put("search", k, getattr(args, k, None))
    put("kd", "teacher", getattr(args, "teacher", None))
    put("search", "mode", getattr(args, "mode", None))
    dpar = getattr(args, "data_parallel", None)
    put("parallel", "data_parallel", dpar if dpar in (None, "all") else _int_flag("--data-parallel", dpar))
    for k in ("compute_dtype", "coordinator_address", "num_processes", "process_id"):
        put("parallel", k, getattr(args, k, None))
    if getattr(args, "plan", None):
        flags["plan"] = args.plan
    if getattr(args, "init_from", None):
        flags["init_from"] = args.init_from
    layers.append(("command-line flags", flags))
    layers.append(("--set", parse_set(getattr(args, "set", []) or [])))
    cfg = build_config(*layers)
    from nasq.parallel import init_from_config

    init_from_config(cfg)  # multi-host values given via --config/--set (no-op when already initialised)
    return cfg


def _int_flag(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise NasqError(f"{flag} {value!r}: expected a device count (e.g. 4) or 'all'.") from None


def _init_distributed(args) -> None:
    """`jax.distributed.initialize` from the multi-host flags, before any command touches the devices."""
    if any(getattr(args, k, None) is not None for k in ("coordinator_address", "num_processes", "process_id")):
        from nasq.parallel import init_distributed

        init_distributed(args.coordinator_address, args.num_processes, args.process_id)


# ------------------------------------------------------------------------------------------ commands
def _resume_base(args) -> dict:
    """With --resume, the run's saved config is the base; flags and --set given now override it."""
    import yaml

    p = Path(args.out) / "config.yaml"
    if not args.resume:
        return {}
    if not p.is_file():
        raise NasqError(f"--resume: {args.out} is not a nasq run directory (no config.yaml).")
    return yaml.safe_load(p.read_text()) or {}


def cmd_finetune(args) -> int:
    from nasq.train.finetune import finetune

    if not args.out:
        raise NasqError("finetune needs --out DIR (the run directory).")
    cfg = config_from_args(args, _resume_base(args))
    finetune(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_search(args) -> int:
    from nasq.search.loop import search

    if not args.out:
        raise NasqError("search needs --out DIR (the run directory).")
    search(config_from_args(args, _resume_base(args)), args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def _run_config(run: str) -> dict:
    """The config snapshot of a run directory (as a preset layer), minus what only training needs."""
    import yaml

    p = Path(run) / "config.yaml"
    if not p.is_file():
        return {}
    d = yaml.safe_load(p.read_text()) or {}
    return {k: v for k, v in d.items() if k in ("model", "data")}


def cmd_eval(args) -> int:
    import json

    from nasq.train.common import evaluate, load_model_dir, load_task_data, model_dir_of

    if args.artifact and args.run:
        from nasq.evaluation import compare_run_and_artifact

        cfg = config_from_args(args, _run_config(args.run))
        print(json.dumps(compare_run_and_artifact(args.run, args.artifact, cfg), indent=2))
        return 0
    if args.artifact:
        from nasq.export.artifact import evaluate_artifact

        cfg = config_from_args(args)
        res = evaluate_artifact(args.artifact, cfg)
        print(json.dumps(res, indent=2))
        return 0
    if not args.run:
        raise NasqError("eval needs a RUN directory or --artifact FILE.")
    model, _meta = load_model_dir(args.run)
    cfg = config_from_args(args, _run_config(args.run))
    data = load_task_data(cfg, model_dir=model_dir_of(args.run))
    res = evaluate(model, data, cfg.data.eval_batch_size)
    print(json.dumps({"task": data.task.name, "dev_rows": len(data.dev), **res}, indent=2))
    return 0


def cmd_bench(args) -> int:
    from nasq import bench

    cfg = config_from_args(args)
    return bench.main(args.what, cfg, args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasq", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fp32 fine-tune, or QAT with --plan and --teacher")
    add_common(f)
    f.add_argument("--plan", help="plan.json: quantization-aware fine-tune of this plan")
    f.add_argument("--teacher", help="fp32 run directory used as KD teacher")
    f.add_argument("--init-from", metavar="SEARCH_RUN",
                   help="with --plan: start QAT from this search run's trained weights and steps "
                        "(default: the teacher's weights, MSE-initialised steps)")
    f.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("search", help="supernet search under a size / latency budget")
    add_common(s)
    add_budget_flags(s)
    s.add_argument("--teacher", help="fp32 fine-tune run: starting weights and KD teacher")
    s.add_argument("--mode", choices=["bilevel", "single"], help="bi-level (DARTS) or single-level (EdMIPS)")
    s.set_defaults(fn=cmd_search)

    e = sub.add_parser("eval", help="dev-set metric of a run (fake-quant) or an artifact (int kernels)")
    e.add_argument("run", nargs="?", help="run directory")
    e.add_argument("--artifact", help="exported .nasq artifact (runs the integer kernels)")
    add_common(e, out=False)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="timing ratios: train-step, search-step, infer")
    b.add_argument("what", choices=["train-step", "search-step", "infer"])
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--seq-len", type=int, default=64)
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--artifact", help="artifact for `bench infer`")
    b.add_argument("--teacher", help="fp32 run directory: the fp32 JAX baseline of `bench infer`")
    add_common(b)
    add_budget_flags(b)
    b.set_defaults(fn=cmd_bench)

    # Further commands live in nasq/commands/<name>.py, each with `register(subparsers)`.
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"nasq.commands.{name}").register(sub)
    return p


# Modules under nasq/commands/ that add subcommands (each defines `register(subparsers)`).
COMMAND_MODULES: list[str] = ["finalize", "export", "pipeline", "report", "baseline", "profile"]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _init_distributed(args)
        return args.fn(args)
    except NasqError as e:
        print(f"nasq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nasq {args.command}: interrupted; continue with the same command plus --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
