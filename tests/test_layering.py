"""The layering holds: contracts kept, nothing a run loads reaches dev/, no import cycles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
# Everything a screening run loads (the CLI and the job runner reach dev/ only inside the
# development commands: synth, train, evaluate, demo and training jobs).
RUNTIME = (
    "io",
    "imaging",
    "models",
    "segment",
    "measure",
    "classify",
    "store",
    "engine",
    "analytics",
    "report",
    "evaluation",
    "vocabulary",
    "errors",
)


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("rbcbatch")


def in_package(graph, package: str) -> set[str]:
    name = f"rbcbatch.{package}"
    return {name} | graph.find_descendants(name)


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_no_runtime_module_imports_a_dev_module(graph):
    dev = graph.find_descendants("rbcbatch.dev") | {"rbcbatch.dev"}
    runtime = set().union(*(in_package(graph, p) for p in RUNTIME))
    assert len(runtime) > 30 and len(dev) > 5
    for module in sorted(runtime):
        chains = [graph.find_shortest_chain(module, d) for d in dev]
        found = [c for c in chains if c]
        assert not found, f"{module} reaches dev/: {' -> '.join(found[0])}"


def test_no_module_imports_one_that_imports_it_back(graph):
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(imported, module)
            # A package's __init__ re-exporting its own modules is not a cycle between modules.
            nested = imported.startswith(module + ".") or module.startswith(imported + ".")
            if back and not nested:
                cycles.append(" -> ".join([module, *back]))
    assert cycles == []


_RUN_AND_LIST_MODULES = """
import sys
from rbcbatch.engine.run import run
summary = run(sys.argv[1], sys.argv[2], workers=1)
assert summary.n_failed == 0, summary.failed
print(",".join(sorted(m for m in sys.modules if m.startswith("rbcbatch"))))
"""


@pytest.mark.slow
def test_a_run_loads_no_dev_module(tiny_cohort, tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST_MODULES, str(tiny_cohort), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.strip().splitlines()[-1].split(",")
    assert "rbcbatch.engine.stages" in loaded and "rbcbatch.store.run_store" in loaded
    assert [m for m in loaded if m.startswith("rbcbatch.dev")] == []
