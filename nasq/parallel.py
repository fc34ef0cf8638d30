"""Data parallelism with `jax.sharding`: one 1-D mesh (axis ``"data"``), replicated state, sharded batches.

The training / search steps stay the same jitted functions; only their *inputs* change place:

    params, optimizer state, gates, search context   -> replicated      NamedSharding(mesh, P())
    Batch fields, cached teacher logits ([B, ...])    -> split on rows   NamedSharding(mesh, P("data"))

`jax.jit` then partitions the computation (GSPMD): every device runs the forward/backward on its `B/D` rows and
the batch reductions in the losses (`sum_i w_i * l_i / sum_i w_i`) become all-reduces. Padding rows carry
weight 0 wherever they land, so losses equal the single-device ones up to float summation order (about 1e-7
relative per step on CPU). No `pmap`, no second code path: with ``parallel.data_parallel == 1`` every helper
here is the identity and the single-device numbers are bit-for-bit unchanged.

Multi-host (``jax.distributed``): every process builds the same epoch plan from the seed
(`nasq.data.batching.iterate_batches` is a pure function of ``(seed, epoch)``), so all processes hold the same
global batch; process ``i`` keeps only the rows its own devices own -- with the default device order rows
``[i*B/P, (i+1)*B/P)`` -- and `jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nasq.errors import NasqError

AXIS = "data"


# ------------------------------------------------------------------------------------------ multi-host
def init_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """`jax.distributed.initialize` from the three flags; returns whether it ran. Call before touching devices.

    All three unset -> nothing to do (single host). Otherwise all three are required (we do not rely on
    cluster auto-detection, so a typo cannot silently start a 1-process "cluster").
    """
    given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise NasqError(f"multi-host runs need all of --coordinator-address, --num-processes and --process-id; "
                        f"missing {', '.join(missing)} (or --set parallel.<name>=...).")
    if num_processes < 1:
        raise NasqError(f"--num-processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise NasqError(f"--process-id {process_id} is out of range for --num-processes {num_processes}: "
                        f"use 0..{num_processes - 1} (one distinct id per host).")
    if ":" not in coordinator_address:
        raise NasqError(f"--coordinator-address {coordinator_address!r} must be HOST:PORT of process 0, "
                        "e.g. 10.0.0.1:1234.")
    if jax.distributed.is_initialized():
        return False
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except RuntimeError as e:
        raise NasqError(f"jax.distributed.initialize failed ({e}); it must run before anything touches the "
                        "devices, and every host needs the same --coordinator-address and --num-processes.") from None
    return True


def init_from_config(cfg) -> bool:
    """`init_distributed` from `cfg.parallel` (for values given by --config / --set)."""
    p = cfg.parallel
    return init_distributed(p.coordinator_address, p.num_processes, p.process_id)


# ------------------------------------------------------------------------------------------------ mesh
def num_devices(data_parallel: int | str) -> int:
    """Devices on the data axis: ``"all"`` -> every (global) device; an int must not exceed what is visible."""
    visible = jax.device_count()
    if data_parallel == "all":
        return visible
    n = int(data_parallel)
    if n < 1:
        raise NasqError(f"parallel.data_parallel must be >= 1 or 'all', got {data_parallel!r}.")
    if n > visible:
        raise NasqError(f"parallel.data_parallel={n} but only {visible} {jax.default_backend()} device(s) are "
                        f"visible; use --data-parallel {visible} (or 'all'), or expose more devices "
                        "(CUDA_VISIBLE_DEVICES; on CPU XLA_FLAGS=--xla_force_host_platform_device_count=N).")
    return n


def make_mesh(cfg) -> Mesh:
    """1-D `Mesh` over the first `num_devices(cfg.parallel.data_parallel)` devices, axis ``"data"``."""
    n = num_devices(cfg.parallel.data_parallel)
    devices = jax.devices()[:n]
    if jax.process_count() > 1 and n != jax.device_count():
        raise NasqError(f"multi-host runs shard over every device: use --data-parallel all (got {n} of "
                        f"{jax.device_count()}).")
    return Mesh(np.asarray(devices), (AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, key: str) -> None:
    """The global batch must split evenly over the data axis (and hence over processes)."""
    d = mesh.devices.size
    if batch_size % d:
        lo, hi = (batch_size // d) * d, -(-batch_size // d) * d
        hint = f"{lo} or {hi}" if lo else f"{hi}"
        raise NasqError(f"{key}={batch_size} is not divisible by the {d} devices on the data axis "
                        f"(parallel.data_parallel); use a multiple of {d} (e.g. --set {key}={hint}) or a "
                        f"data_parallel that divides {batch_size}.")


# ------------------------------------------------------------------------------------------- placement
def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf fully replicated over `mesh` (``P()``)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) or x.is_fully_addressable else x
        if isinstance(x, jax.Array):  # already global
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def host_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch owned by this process's devices (contiguous under the default order)."""
    sharding = NamedSharding(mesh, P(AXIS))
    idx = sharding.addressable_devices_indices_map((batch_size,)).values()
    starts = [s[0].start or 0 for s in idx]
    stops = [batch_size if s[0].stop is None else s[0].stop for s in idx]
    lo, hi = min(starts), max(stops)
    if hi - lo != sum(b - a for a, b in zip(starts, stops)):
        raise NasqError("this process's devices do not own a contiguous block of batch rows; use the default "
                        "device order (jax.devices()) for the data mesh.")
    return slice(lo, hi)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Split every leaf of `batch` (a `Batch`, an array, ...) on its first axis over ``"data"``.

    Takes the *global* batch (what `iterate_batches` yields on every process). Single process: one
    `jax.device_put`. Multi-process: this process keeps `host_rows` and the global array is assembled with
    `jax.make_array_from_process_local_data`.
    """
    if batch is None:
        return None
    sharding = NamedSharding(mesh, P(AXIS))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def put(x):
        x = np.asarray(x)
        rows = host_rows(mesh, x.shape[0])
        return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)

    return jax.tree.map(put, batch)


# --------------------------------------------------------------------------------------- loop helper
@dataclasses.dataclass(frozen=True)
class DataParallel:
    """What the training / search loops call. ``mesh is None`` (data_parallel == 1): every method is the identity."""

    mesh: Mesh | None = None
    compute_dtype: str = "float32"

    @classmethod
    def from_config(cfg_cls, cfg, *, batch_sizes: dict[str, int] | None = None) -> DataParallel:
        """Mesh from `cfg.parallel`; checks that each ``{config_key: size}`` in `batch_sizes` splits evenly."""
        p = cfg.parallel
        init_from_config(cfg)
        mesh = None
        if p.data_parallel == "all" or int(p.data_parallel) > 1 or jax.process_count() > 1:
            mesh = make_mesh(cfg)
            if mesh.devices.size == 1 and jax.process_count() == 1:
                mesh = None
        if mesh is not None:
            for key, size in (batch_sizes or {}).items():
                check_batch_size(size, mesh, key)
        return cfg_cls(mesh, p.compute_dtype)

    @property
    def size(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.devices.size)

    def replicate(self, tree):
        return tree if self.mesh is None else replicate(tree, self.mesh)

    def shard(self, batch):
        return batch if self.mesh is None or batch is None else shard_batch(batch, self.mesh)

    def wrap(self, fn):
        """`fn` called inside `compute()`; `fn` itself when there is nothing to change."""
        if self.compute_dtype == "float32":
            return fn

        def wrapped(*args, **kwargs):
            with self.compute():
                return fn(*args, **kwargs)

        return wrapped

    def compute(self):
        """Context for running the jitted steps: bf16 matmul passes when ``compute_dtype == "bfloat16"``.

        Implemented as `jax.default_matmul_precision("bfloat16")`: parameters, activations, losses, optimizer
        state and the quantizers' elementwise math all stay float32; only the dot/conv passes use bf16 on
        backends that honour it (GPU/TPU). On CPU XLA ignores it (same numbers as float32).
        """
        if self.compute_dtype == "bfloat16":
            return jax.default_matmul_precision("bfloat16")
        return contextlib.nullcontext()
