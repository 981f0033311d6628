"""The README's map of the code matches the tree: every module is on it, and
everything on it exists."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SRC = ROOT / "src" / "splitft"


def the_map() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("\nsrc/splitft/\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def named(lines: list[str]) -> set[str]:
    """The paths a line of the map starts with (``eval.py report.py`` names two)."""
    out = set()
    for line in lines:
        if line.startswith("  ") and not line.startswith("   "):
            for word in line.split():
                if re.fullmatch(r"[\w/]+(\.py|/)", word):
                    out.add(word)
                else:
                    break
    return out


def test_every_module_is_on_the_map():
    paths = named(the_map())
    missing = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        if f.name == "__init__.py":
            continue
        folder = f"{rel.parent}/" if rel.parent != Path(".") else None
        if str(rel) not in paths and folder not in paths:
            missing.append(str(rel))
    assert not missing, f"README's map of the code lacks {missing}"


def test_everything_on_the_map_exists():
    for path in named(the_map()):
        assert (SRC / path).exists(), f"README names {path}, which is not in src"
