"""The declared floors (pyproject.toml) equal the pins that `make test-oldest` installs (constraints/)."""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pytest brings tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
OLDEST = ROOT / "constraints" / "oldest.txt"
# pinned beside the floors only to keep the oldest environment coherent (see the comment in the file)
COHERENCE_PINS = {"pytorch-lightning": "lightning"}


def _floors() -> dict[str, Version]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        req = Requirement(dep)
        lower = [s for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: {dep!r} has no single >= floor"
        floors[canonicalize_name(req.name)] = Version(lower[0].version)
    return floors


def _check_pins():  # scripts/check_pins.py, which `make test-oldest` runs before the suite
    spec = importlib.util.spec_from_file_location("check_pins", ROOT / "scripts" / "check_pins.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_floor_is_pinned_exactly_at_its_version_in_the_oldest_constraints() -> None:
    pins = {canonicalize_name(n): Version(v) for n, v in _check_pins().pins(OLDEST).items()}
    floors = _floors()
    assert {n: pins.get(n) for n in floors} == floors
    extra = set(pins) - set(floors)
    assert extra == set(COHERENCE_PINS), (
        f"{OLDEST.name} pins {sorted(extra)}, which pyproject.toml does not floor"
    )
    for pin, partner in COHERENCE_PINS.items():
        assert pins[pin] == pins[partner]


def test_check_pins_passes_on_the_installed_versions_and_names_each_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check_pins = _check_pins()
    good = tmp_path / "good.txt"
    good.write_text(f"# installed\ntorch=={version('torch')}\nxxhash=={version('xxhash')}\n")
    assert check_pins.main([str(good)]) == 0
    bad = tmp_path / "bad.txt"
    bad.write_text(f"torch=={version('torch')}\nxxhash==0.0.1\n")
    assert check_pins.main([str(bad)]) == 1
    assert f"xxhash: installed {version('xxhash')}, {bad} pins 0.0.1" in capsys.readouterr().err
    loose = tmp_path / "loose.txt"
    loose.write_text("torch>=2.6\n")
    with pytest.raises(SystemExit, match=r"'torch>=2.6' is not an exact pin \(name==version\)"):
        check_pins.main([str(loose)])
