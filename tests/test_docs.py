"""The README a newcomer reads: its example runs as printed, and its links lead somewhere.

The docs site itself is checked by `make docs` (`mkdocs build --strict`, part of `make test`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def test_readme_example_runs_and_prints_what_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (example,) = _python_blocks(README)
    # the getting-started page shows the same example
    assert example in _python_blocks((REPO / "docs" / "getting-started.md").read_text())
    promised = re.search(r"print\(freeze\.last_check\.summary\(\)\)  # (.+)$", example, re.MULTILINE)
    assert promised, "the example should show what it prints"
    monkeypatch.chdir(tmp_path)  # the Trainer writes its checkpoints here
    exec(compile(example.replace("max_epochs=2", "max_epochs=1"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == promised.group(1)


def test_readme_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/getting-started.md" in local and "LICENSE" in local
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, missing
