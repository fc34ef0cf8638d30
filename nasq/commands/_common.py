"""What every command shares: the shared flags, and the one way flags become the typed ``Config``.

Precedence (lowest to highest): defaults < preset < ``--config FILE`` < dedicated flags < ``--set``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nasq.config import Config, build_config, load_yaml, parse_set
from nasq.errors import NasqError
from nasq.io import read_yaml
from nasq.parallel import init_distributed, init_from_config

__all__ = ["add_budget_flags", "add_common", "config_from_args", "init_distributed_from_args", "parse_plan_list",
           "resume_base", "run_config", "user_layers"]


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


def user_layers(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """The user's config layers, in precedence order: ``--config FILE``, the dedicated flags, ``--set``."""
    layers: list[tuple[str, dict]] = []
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
    return layers


def config_from_args(args: argparse.Namespace, preset: dict | None = None) -> Config:
    """The typed config of a command: ``preset`` (e.g. a run's saved config) under the user's layers."""
    cfg = build_config(("preset", preset or {}), *user_layers(args))
    init_from_config(cfg)  # multi-host values given via --config/--set (no-op when already initialised)
    return cfg


def _int_flag(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise NasqError(f"{flag} {value!r}: expected a device count (e.g. 4) or 'all'.") from None


def init_distributed_from_args(args) -> None:
    """`jax.distributed.initialize` from the multi-host flags, before any command touches the devices."""
    if any(getattr(args, k, None) is not None for k in ("coordinator_address", "num_processes", "process_id")):
        init_distributed(args.coordinator_address, args.num_processes, args.process_id)


def resume_base(args) -> dict:
    """With --resume, the run's saved config is the base; flags and --set given now override it."""
    p = Path(args.out) / "config.yaml"
    if not args.resume:
        return {}
    if not p.is_file():
        raise NasqError(f"--resume: {args.out} is not a nasq run directory (no config.yaml).")
    return read_yaml(p, what="run config", max_bytes=2**24)


def run_config(run: str) -> dict:
    """The config snapshot of a run directory (as a preset layer), minus what only training needs."""
    p = Path(run) / "config.yaml"
    if not p.is_file():
        return {}
    return {k: v for k, v in read_yaml(p, what="run config", max_bytes=2**24).items() if k in ("model", "data")}


def parse_plan_list(text: str) -> str | list[str]:
    """``"a.json"`` -> ``"a.json"``; ``"a.json,b.json"`` -> ``["a.json", "b.json"]``."""
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths:
        raise argparse.ArgumentTypeError("expected PLAN.json[,PLAN.json...]")
    return paths[0] if len(paths) == 1 else paths
