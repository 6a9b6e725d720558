"""docs/packed.md: its first example runs as printed and logs what its comment says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "packed.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", PAGE, flags=re.DOTALL | re.MULTILINE)


def test_first_example_trains_three_epochs_and_logs_each_variants_val_acc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # main: the block used undefined names, ran Lightning's default 1000 epochs and, with no validation
    # loader, logged no val_acc although its comment said so
    example = _blocks("python")[0]
    promised = re.search(r"^print\(.*\)  # (.+)$", example, re.MULTILINE)
    assert promised, "the example should show what it prints"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "docs/packed.md", "exec"), namespace)
    assert capsys.readouterr().out.strip().splitlines()[-1] == promised.group(1)
    assert namespace["trainer"].current_epoch == 3
