"""The platform's generic layers stay generic: nothing under ``train/`` or ``tune/`` imports a
batch class or a view-specific module, and nothing anywhere branches on a model's name.

Read with ``ast`` (imports inside functions and under ``TYPE_CHECKING`` count too), so a lazy
import cannot sneak a sentence assumption back into the loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "mirror"
ROOT = PACKAGE.parents[1]
GENERIC = sorted((PACKAGE / "train").glob("*.py")) + sorted((PACKAGE / "tune").glob("*.py"))
VIEW_SPECIFIC = (  # modules and names that belong to one data view
    "mirror.data.batch", "mirror.data.collate", "mirror.data.views.sequence",
    "SequenceBatch", "SequenceInfo", "CollateConfig", "MaskSpec", "iter_sequence_batches",
)  # fmt: skip


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names |= {alias.name for alias in node.names}
    return names


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_generic_layers_import_nothing_view_specific(path):
    found = sorted(name for name in imported_names(path) if any(name == v or name.startswith(f"{v}.") for v in VIEW_SPECIFIC))
    assert not found, f"{path.relative_to(ROOT)} imports {found}"


def test_nothing_branches_on_a_model_name():
    pattern = re.compile(r"""\bmodel(_name|\.name|_spec\.name)?\s*(==|!=|in)\s*[\("'\[]""")
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
