"""Data parallelism (`nasq.parallel`): 4 host-platform devices reproduce the 1-device runs; clear errors.

The device count is fixed when JAX starts, so the multi-device runs happen in subprocesses with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`. One subprocess per device count runs the whole chain
(fp32 fine-tune -> search with KD -> finalize -> QAT fine-tune with KD) through `nasq.cli.main`.

Tolerance: per logged step `|a - b| <= 1e-4 * max(|a|, |b|) + 1e-6`. Sharding only changes the order of the
batch sums (partial sums per device + all-reduce); we observe ~1e-6 relative on the task loss after a few Adam
steps. The absolute term is for the KD loss, a KL of two nearly equal distributions (~7e-5 here) whose
relative error is larger (~4e-4 relative, 3e-8 absolute).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import yaml

from nasq.config import build_config
from nasq.errors import NasqError
from nasq.parallel import DataParallel, check_batch_size, init_distributed, make_mesh, num_devices

RTOL, ATOL = 1e-4, 1e-6
REPO = Path(__file__).resolve().parents[1]

RUNNER = """
import sys
from nasq.cli import main
cfg, out, dp = sys.argv[1], sys.argv[2], sys.argv[3]
def run(*argv):
    rc = main([*argv, "--config", cfg, "--data-parallel", dp])
    assert rc == 0, (argv, rc)
run("finetune", "--out", f"{out}/teacher")
run("search", "--out", f"{out}/search", "--teacher", f"{out}/teacher", "--avg-bits", "3")
assert main(["finalize", f"{out}/search", "--out", f"{out}/plan.json"]) == 0
run("finetune", "--out", f"{out}/qat", "--plan", f"{out}/plan.json", "--teacher", f"{out}/teacher")
"""


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NASQ_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    # conftest's XLA_FLAGS (compile at -O0) plus the host device count
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _config(tmp_path, tiny_model_dir, glue_dir, **train) -> Path:
    cfg = {"model": {"name": str(tiny_model_dir), "max_len": 32},
           "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 128, "buckets": [32],
                    "eval_batch_size": 64},
           "train": {"max_steps": 4, "batch_size": 16, "lr": 1e-3, "log_every": 1, "checkpoint_every": 1000,
                     **train},
           "search": {"space": "tiny", "gate_lr": 0.1}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b)) + ATOL


@pytest.fixture(scope="module")
def chains(tiny_model_dir, glue_dir, tmp_path_factory):
    """{devices: output dir} of the same chain run on 1 and 4 devices."""
    tmp = tmp_path_factory.mktemp("parallel")
    cfg = _config(tmp, tiny_model_dir, glue_dir)
    out = {}
    for devices in (1, 4):
        d = tmp / f"d{devices}"
        r = subprocess.run([sys.executable, "-c", RUNNER, str(cfg), str(d), str(devices)], env=_env(devices),
                           capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        out[devices] = d
    return out


@pytest.mark.slow
def test_sharded_runs_were_sharded(chains):
    """Each run records the size of the device mesh its loop replicated the state and sharded the batches over
    (`run.json` `devices`): 4 in the 4-device chain, 1 in the other, so the equality tests below compare a really
    sharded run with an unsharded one."""
    for devices, out in chains.items():
        for run in ("teacher", "search", "qat"):
            assert json.loads((out / run / "run.json").read_text())["devices"] == devices, (devices, run)
    assert yaml.safe_load((chains[4] / "search" / "config.yaml").read_text())["parallel"]["data_parallel"] == 4
    assert (chains[4] / "search" / "checkpoints").is_dir()  # orbax saved the replicated arrays


@pytest.mark.parametrize("run", ["teacher", "search", "qat"])
@pytest.mark.slow
def test_four_devices_match_one_device_loss_trajectory(chains, run):
    m1, m4 = _metrics(chains[1] / run), _metrics(chains[4] / run)
    steps1 = [m for m in m1 if "task_loss" in m]
    steps4 = [m for m in m4 if "task_loss" in m]
    assert [m["step"] for m in steps1] == [m["step"] for m in steps4] == [1, 2, 3, 4]
    keys = ["task_loss", "loss", "kd_loss", "gate_loss", "expected_cost"]
    for a, b in zip(steps1, steps4):
        for k in keys:
            if k in a:
                assert _close(a[k], b[k]), (run, a["step"], k, a[k], b[k])
    ev1 = ([m for m in m1 if m.get("split") == "dev"] or [{}])[-1]  # search runs log no dev eval
    ev4 = ([m for m in m4 if m.get("split") == "dev"] or [{}])[-1]
    for k in ev1:
        if isinstance(ev1[k], float):
            assert _close(ev1[k], ev4[k]), (run, k, ev1[k], ev4[k])


@pytest.mark.slow
def test_four_devices_give_the_same_finalized_plan(chains):
    p1 = json.loads((chains[1] / "plan.json").read_text())
    p4 = json.loads((chains[4] / "plan.json").read_text())
    assert p1["tensors"] == p4["tensors"]
    assert p1["totals"] == p4["totals"]


def test_indivisible_batch_exits_2_with_message(tiny_model_dir, glue_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, glue_dir, batch_size=10)
    r = subprocess.run([sys.executable, "-m", "nasq.cli", "search", "--config", str(cfg), "--out",
                        str(tmp_path / "s"), "--avg-bits", "3", "--data-parallel", "4"],
                       env=_env(4), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 2, r.stderr
    assert "train.batch_size=10 is not divisible by the 4 devices" in r.stderr
    assert "--set train.batch_size=8 or 12" in r.stderr
    assert not (tmp_path / "s").exists()  # fails before the run directory is created


# ------------------------------------------------------------------------------- in-process (1 device)
def test_single_device_is_identity():
    dp = DataParallel.from_config(build_config(("t", {})))
    assert dp.mesh is None and dp.size == 1
    tree = {"a": jax.numpy.ones(3)}
    assert dp.replicate(tree) is tree and dp.shard(tree) is tree
    f = lambda: 1
    assert dp.wrap(f) is f


def test_too_many_devices_is_a_clear_error():
    n = jax.device_count() + 1
    with pytest.raises(NasqError, match=f"data_parallel={n} but only {n - 1}"):
        num_devices(n)
    with pytest.raises(NasqError, match="XLA_FLAGS"):
        make_mesh(build_config(("t", {"parallel": {"data_parallel": n}})))
    assert num_devices("all") == jax.device_count()


def test_batch_check_message_names_numbers_and_fix():
    mesh = make_mesh(build_config(("t", {})))
    check_batch_size(7, mesh, "train.batch_size")  # 1 device: anything splits

    class Fake:  # a 4-device mesh stand-in (only .devices.size is read)
        class devices:
            size = 4

    with pytest.raises(NasqError, match=r"data.eval_batch_size=3 .* 4 devices .* --set data.eval_batch_size=4"):
        check_batch_size(3, Fake, "data.eval_batch_size")


def test_multi_host_flag_errors():
    with pytest.raises(NasqError, match="process_id 2 must be < num_processes 2"):
        build_config(("t", {"parallel": {"num_processes": 2, "process_id": 2}}))
    with pytest.raises(NasqError, match="--process-id 3 is out of range for --num-processes 2"):
        init_distributed("10.0.0.1:1234", 2, 3)
    with pytest.raises(NasqError, match="missing --num-processes, --process-id"):
        init_distributed("10.0.0.1:1234", None, None)
    with pytest.raises(NasqError, match="HOST:PORT"):
        init_distributed("10.0.0.1", 2, 0)
    assert init_distributed(None, None, None) is False
    with pytest.raises(NasqError, match="bfloat16"):
        build_config(("t", {"parallel": {"compute_dtype": "fp16"}}))
