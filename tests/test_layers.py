"""The layers contract: no module imports a module of a layer above it.

From the bottom: settings, set-up and what runs on a model (``config``,
``interrupts``, ``runs``, ``ranks``, ``lora``, ``models/``, ``data/``, ``eval``,
``report``, ``plots``, ``trackers``), the split step (``split/``), the
transports (``transport/``: of ``split/`` only the messages and refusals it
carries), the simulation (``sim/``), the federation (``federation/``), and the
command line (``cli``). Read from the source, every import (inside functions too), so a
lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "splitft"
BASE = ("splitft.config", "splitft.interrupts", "splitft.runs", "splitft.ranks")
BASE += ("splitft.lora",)
BASE += ("splitft.models", "splitft.data", "splitft.eval", "splitft.report")
BASE += ("splitft.plots", "splitft.trackers")
ABOVE_SPLIT = ("splitft.transport", "splitft.sim", "splitft.federation")
ENTRY = ("splitft.cli",)
# module prefix -> the prefixes it may not import
FORBIDDEN = {
    **{b: ("splitft.split", *ABOVE_SPLIT, *ENTRY) for b in BASE},
    "splitft.split": (*ABOVE_SPLIT, *ENTRY),
    "splitft.transport": ("splitft.sim", "splitft.federation", *ENTRY),
    "splitft.sim": ("splitft.federation", "splitft.transport", *ENTRY),
    "splitft.federation": ENTRY,
}
# what transport/ may take from split/: the messages and refusals on the wire
CARRIED = ("splitft.split.messages", "splitft.split.errors")


def modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [name for name in out if name.startswith("splitft")]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("module, path", list(modules()), ids=lambda x: str(x))
def test_no_module_imports_a_layer_above_it(module, path):
    rules = [p for p in FORBIDDEN if _under(module, p)]
    bad = []
    for name in imports(path):
        if _under(module, "splitft.transport") and any(
            _under(name, c) for c in CARRIED
        ):
            continue
        if _under(module, "splitft.transport") and name == "splitft.split":
            continue  # "from splitft.split import messages" names the package
        for rule in rules:
            if any(_under(name, f) for f in FORBIDDEN[rule]):
                bad.append(name)
    assert not bad, f"{module} imports {sorted(set(bad))}, a layer above it"


def test_every_module_is_in_a_layer():
    layered = (*FORBIDDEN, *ENTRY, "splitft")
    loose = [m for m, _ in modules() if not any(_under(m, p) for p in layered)]
    assert not loose, f"modules in no layer: {loose}"


def test_the_deployed_client_needs_no_coordinator_or_simulation():
    path = SRC / "federation" / "remote.py"
    names = imports(path)
    banned = ("splitft.federation.coordinator", "splitft.federation.simulation")
    assert not [n for n in names if any(_under(n, b) for b in banned)], names
