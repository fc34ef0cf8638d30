"""The import architecture (docs/ARCHITECTURE.md): layers import only downward, no cycles, every module placed."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_kept():
    """`lint-imports` over pyproject.toml's contracts: the layer order and no cycles between sibling packages.

    In a subprocess: import-linter's console takes over the process's output streams."""
    cmd = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    r = subprocess.run([sys.executable, "-c", cmd, "--config", "pyproject.toml", "--no-cache"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "2 kept, 0 broken" in r.stdout


def test_every_module_has_a_layer():
    """A new top-level module or package must be placed in the layer contract (else it escapes the check)."""
    (layers,) = [c["layers"] for c in _contracts() if c["type"] == "layers"]
    placed = {m.strip() for layer in layers for m in layer.split("|")}
    placed |= {m.rsplit(".", 1)[0] for m in placed if m.count(".") > 1}
    top = {f"nasq.{p.stem}" for p in (REPO / "nasq").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    unplaced = sorted(top - placed - {"nasq.testing"})  # nasq.testing: test helpers, imported by tests only
    assert not unplaced, f"add {unplaced} to [tool.importlinter] layers in pyproject.toml"


@pytest.mark.parametrize("name", ["Layers", "No import cycles"])
def test_contracts_present(name):
    assert any(c["name"].startswith(name) for c in _contracts())


def test_durations_record_sums_each_files_cases(tmp_path):
    """tests/durations.py: seconds per test file from a JUnit report (conftest.py orders files by it)."""
    from durations import file_seconds

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="x" time="1.5"/>'
                   '<testcase classname="tests.test_a.TestK" name="y" time="2"/>'
                   '<testcase classname="tests.test_b" name="z" time="0.25"/></testsuite></testsuites>')
    assert file_seconds(str(xml)) == {"tests/test_a.py": 3.5, "tests/test_b.py": 0.25}
