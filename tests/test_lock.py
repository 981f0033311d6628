"""The dependency lock agrees with pyproject.toml and is what the tests run on.

``requirements.lock`` decides what installs (issue 18); these checks are offline.
``make lock-check`` adds the one that needs the registry: the lock made again
from its own pins pins the same versions.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
FLOOR = ROOT / "requirements-floor.txt"


def pins(path: Path) -> dict[str, Version]:
    """``name==version`` lines of a requirements file, by canonical name."""
    found: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one pin a line, nothing else
        assert spec.operator == "==", f"{path.name}: {line!r} is not a pin"
        found[canonicalize_name(req.name)] = Version(spec.version)
    return found


def declared() -> list[Requirement]:
    """The project's dependencies and its extras (dev and the trackers)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    lines = project["dependencies"] + [line for extra in extras for line in extra]
    return [Requirement(line) for line in lines]


def test_every_declared_dependency_is_locked_within_its_range():
    lock = pins(LOCK)
    missing = [str(r) for r in declared() if canonicalize_name(r.name) not in lock]
    assert not missing, f"not in {LOCK.name} (run `make lock`): {missing}"
    outside = [
        f"{r} (locked {lock[canonicalize_name(r.name)]})"
        for r in declared()
        if not r.specifier.contains(lock[canonicalize_name(r.name)], prereleases=True)
    ]
    assert not outside, f"{LOCK.name} pins outside pyproject's range: {outside}"


def test_every_range_has_both_bounds_and_the_floor_pins_the_lower_one():
    floor = pins(FLOOR)
    wrong = []
    for req in declared():
        ops = {s.operator: Version(s.version) for s in req.specifier}
        low = ops.get(">=", ops.get("=="))
        if low is None or not ({"<", "=="} & ops.keys()):
            wrong.append(f"{req}: needs a lower and an upper bound")
        elif floor.get(canonicalize_name(req.name)) != low:
            pinned = floor.get(canonicalize_name(req.name))
            wrong.append(f"{req}: {FLOOR.name} pins {pinned}, not {low}")
    extra = floor.keys() - {canonicalize_name(r.name) for r in declared()}
    assert not wrong and not extra, (wrong, sorted(extra))


def test_torch_is_the_cpu_wheel_on_this_disk():
    # a looser pin pulls a multi-GB CUDA build (README, set-up)
    assert str(pins(LOCK)["torch"]) == "2.13.0+cpu"


def test_the_installed_packages_are_the_locked_ones():
    """The environment the tests run in was installed from the lock."""
    wrong = {}
    for name, version in pins(LOCK).items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = f"locked {version}, installed {installed}"
    assert not wrong, f"not installed from {LOCK.name} (make test does): {wrong}"
