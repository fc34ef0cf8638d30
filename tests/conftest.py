import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("NASQ_NO_PROGRESS", "1")
# Many tests (and their subprocesses) compile the same tiny models: share XLA's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
# The tests run tiny models, where XLA's compile time (LLVM's optimisation passes) is most of the time: compile them
# at LLVM -O0 (XLA's own HLO passes still run; float semantics are kept, no fast-math either way). Ten slow tests
# took 39% less CPU this way (bench.md; issue 18, CI time). Benchmarks and experiments compile as users do.
if os.environ.get("NASQ_TEST_FAST_COMPILE", "1") != "0":  # NASQ_TEST_FAST_COMPILE=0: compile as users do
    os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                               + os.environ.get("XLA_FLAGS", "")).strip()

import pytest
import tiers

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


DURATIONS = Path(__file__).with_name("durations.json")


def pytest_configure(config):
    """The fast tier (a mark expression that leaves out `slow`) runs property tests on fewer examples (tiers.py).
    With a durations record, xdist's own `--dist loadfile` order (most tests first) gives way to the record's."""
    tiers.FAST = "not slow" in (config.getoption("markexpr", "") or "")
    if DURATIONS.is_file() and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    """Longest test files first, by ``tests/durations.json`` (seconds per file from a full run, written by
    ``tests/durations.py``): with xdist's reordering off (``pytest_configure``), ``--dist loadfile`` hands files
    to the workers in collection order, so the long ones start first and the run ends sooner (longest processing
    time first). Tests keep their order within a file; files the record lacks go last, in their own order."""
    if not DURATIONS.is_file():
        return
    try:
        seconds = {str(k): float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise pytest.UsageError(f"{DURATIONS}: not a {{file: seconds}} record ({e}); rewrite it with "
                                "tests/durations.py or delete it") from None
    def file_of(item):
        return item.nodeid.split("::")[0]

    first = {}
    for i, item in enumerate(items):
        first.setdefault(file_of(item), i)
    items.sort(key=lambda it: (-seconds.get(file_of(it), 0.0), first[file_of(it)]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from nasq.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def glue_dir():
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(tiny model, `tiny` search space, its resolved SearchedTensors); treat as read-only."""
    from nasq.contract.space import load_space, resolve
    from nasq.models.loading import load_pretrained
    from nasq.models.surgery import linear_shapes

    model, _, _ = load_pretrained(tiny_model_dir, 2)
    space = load_space("tiny")
    tensors = resolve(space, linear_shapes(model.bert), model.config.num_attention_heads)
    return model, space, tensors


@pytest.fixture(scope="module")
def grid_config(tmp_path_factory, tiny_model_dir, glue_dir):
    """The tiny grid of tests/grid_support.py: (directory, grid.yaml path)."""
    from grid_support import make_grid_config

    return make_grid_config(tmp_path_factory, tiny_model_dir, glue_dir)
