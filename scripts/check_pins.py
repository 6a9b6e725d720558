"""Check that the running environment has exactly the versions a constraints file pins.

``make test-oldest`` runs this before the suite, so a green run on ``.venv-oldest`` means the suite ran on
the declared floors (constraints/oldest.txt), not on whatever pip resolved. Prints the stack it found.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement


def pins(path: Path) -> dict[str, str]:
    """Return ``{name: version}`` for each ``name==version`` line of a constraints file."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        if spec.operator != "==":
            raise SystemExit(f"{path}: {line!r} is not an exact pin (name==version)")
        out[req.name] = spec.version
    return out


def main(argv: list[str]) -> int:
    """Compare installed versions with the pins of ``argv[0]``; exit 1 naming every mismatch."""
    if len(argv) != 1:
        raise SystemExit("usage: check_pins.py CONSTRAINTS_FILE")
    path = Path(argv[0])
    bad = []
    for name, want in pins(path).items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "not installed"
        if have.split("+", 1)[0] != want:
            bad.append(f"{name}: installed {have}, {path} pins {want}")
    print(f"Python {sys.version.split()[0]}; " + ", ".join(f"{n} {v}" for n, v in pins(path).items()))
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
