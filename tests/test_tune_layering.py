"""``mirror.tune`` stays layered and its scheduler table stays whole.

The imports are read with ``ast`` (top level, inside functions and under ``TYPE_CHECKING``
alike), so the old pbt <-> sweep <-> space circle cannot come back through a lazy import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from mirror.tune.schedulers import SCHEDULERS, SchedulerStrategy
from mirror.tune.spec import SEARCH_OPTIONS

TUNE = Path(__file__).resolve().parents[1] / "platform" / "mirror" / "tune"
LAYERS = (  # bottom up: a module may import only modules listed before it
    "fields",
    "fit_slots",
    "spec",
    "report",
    "trial",
    "pbt",
    "schedulers",
    "space",
    "sweep",
)


def tune_imports(module: str) -> set[str]:
    """The ``mirror.tune`` modules that ``module`` imports anywhere in its file."""
    tree = ast.parse((TUNE / f"{module}.py").read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = "mirror.tune" if node.level else ""  # a relative import is a sibling
            base = ".".join(part for part in (package, node.module or "") if part)
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return {
        name.split(".")[2] for name in names if name.startswith("mirror.tune.") and name != module
    }


def test_every_tune_module_has_a_layer():
    modules = {path.stem for path in TUNE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_tune_module_imports_only_lower_layers(module):
    higher = {name for name in tune_imports(module) if LAYERS.index(name) >= LAYERS.index(module)}
    assert not higher, f"mirror.tune.{module} imports {sorted(higher)}, at or above its layer"


def test_the_layering_check_sees_lazy_imports():
    assert "fit_slots" in tune_imports("pbt")  # imported only inside functions


def test_loading_a_sweep_file_does_not_import_ray():
    code = "import sys, mirror.tune.space; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_scheduler_table_has_asha_fifo_and_pbt_in_the_order_errors_list_them():
    assert list(SCHEDULERS) == ["asha", "fifo", "pbt"]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_strategy_provides_every_field(name):
    strategy = SCHEDULERS[name]
    assert isinstance(strategy, SchedulerStrategy)
    for field in fields(SchedulerStrategy):
        value = getattr(strategy, field.name)
        assert value is not None, f"{name}.{field.name} is not set"
        if str(field.type).startswith("Callable"):
            assert callable(value), f"{name}.{field.name} is not callable"
    assert all(isinstance(option, str) for option in strategy.options)
    assert strategy.searches and set(strategy.searches) <= set(SEARCH_OPTIONS)
    restricted = set(strategy.searches) != set(SEARCH_OPTIONS)
    assert bool(strategy.search_refusal) == restricted  # a refused search says why
    assert isinstance(strategy.whole_population_at_once, bool)


def test_only_pbt_stops_members_at_their_last_epoch():
    assert SCHEDULERS["pbt"].stop(3) == {"training_iteration": 3}
    assert SCHEDULERS["asha"].stop(3) is None and SCHEDULERS["fifo"].stop(3) is None


def test_schedulers_without_driver_extras_add_no_callbacks():
    for name in ("asha", "fifo"):
        with SCHEDULERS[name].during_sweep("s", 2) as callbacks:
            assert callbacks == []
