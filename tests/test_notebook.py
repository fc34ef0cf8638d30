"""notebooks/inspect_allocation.ipynb runs headless (nbclient, python3 kernel) on a tiny plan."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_allocation.ipynb"


def test_notebook_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, "strip outputs before committing"


@pytest.fixture(scope="module")
def tiny_plan(tiny_model_dir, tmp_path_factory):
    import numpy as np

    from nasq.contract.cost import Budget
    from nasq.contract.plan import make_plan
    from nasq.contract.space import load_space, resolve
    from nasq.models.loading import load_pretrained
    from nasq.models.surgery import linear_shapes, model_param_shapes

    model, _, _ = load_pretrained(tiny_model_dir, 2)
    space = load_space("tiny")
    tensors = resolve(space, linear_shapes(model.bert), model.config.num_attention_heads)
    rng = np.random.default_rng(1)
    bits = [tuple(int(b) for b in rng.choice(t.choices, t.num_groups)) for t in tensors]
    plan = make_plan(tensors, bits, space=space, budget=Budget(bytes=20_000, convention="encoder", source="t"),
                     param_shapes=model_param_shapes(model), provenance={"method": "random"})
    return plan.save(tmp_path_factory.mktemp("nb") / "plan.json")


def test_notebook_executes(tiny_plan, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    out = tmp_path / "figs"
    monkeypatch.setenv("NASQ_RUN", str(tiny_plan))
    monkeypatch.setenv("NASQ_REPORT_OUT", str(out))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises CellExecutionError
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (out / "bits_heatmap.png").is_file() and (out / "report.html").is_file()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(tiny_plan) in text and "encoder convention" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
