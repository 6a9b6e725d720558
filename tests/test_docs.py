"""Every example in README.md and docs/*.md runs as printed, and does what its comments say.

- Every ```python block runs: the blocks of a page in order, in one namespace, in a temporary
  directory, with the small fixtures of :func:`_fixtures` for the names the docs take as given
  (``model``, ``loader``, ``dm``, ... : see docs/development.md, "Examples in the docs"). A block that
  cannot run here is marked by an HTML comment on the line before it, ``<!-- skip: REASON -->``,
  and is reported as skipped with that reason.
- Every shell block (```bash, ```console) is run here (``lightning-freeze ...`` commands, whose
  printed output is compared when the block shows it), or names the test that runs its commands
  (``<!-- tested: tests/FILE.py::TEST -->``), or says why no test can run it
  (``<!-- skip: needs a SLURM cluster -->``).

The docs site itself is checked by `make docs` (`mkdocs build --strict`, part of `make test`).
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
#: pages other helpers are rewriting for issue 18 (docs/packed.md): an unmarked block there is skipped
#: with this reason until the page marks it itself
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
_MARK = re.compile(r"<!--\s*(skip|tested):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    mark: tuple[str, str] | None  # ("skip", reason) or ("tested", "tests/x.py::test_y")


def _blocks(page: str) -> list[Block]:
    text = (REPO / page).read_text()
    found = []
    for match in _FENCE.finditer(text):
        before = [line for line in text[: match.start()].splitlines() if line.strip()]
        mark = _MARK.search(before[-1]) if before else None
        line = text[: match.start()].count("\n") + 1
        found.append(Block(page, line, match.group(1), match.group(2), mark.groups() if mark else None))
    return found


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


# ------------------------------------------------------------------------------------------------
# the fixtures the examples assume (docs/development.md lists them)
# ------------------------------------------------------------------------------------------------
def _fixtures() -> dict[str, Any]:
    """``model``/``MyModule``, ``loader``/``train_loader``/``val_loader``, ``dm``, ``loss_fn``,
    ``optimizer``, ``evaluate``: a MultiBranchModule over ``Linear(16, 32) + BatchNorm1d + ReLU`` (7
    backbone tensors) with a 3-class branch ``"a"``, and 64 samples of 16 features in batches of 32."""
    import lightning as L
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_freeze import MultiBranchModule

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    y = (x @ torch.randn(16, 3, generator=generator)).argmax(1)
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=32)

    class MyModule(MultiBranchModule):
        """The examples' model: backbone + branch "a", with its own train and val data."""

        def __init__(self) -> None:
            backbone = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
            super().__init__(backbone, {"a": nn.Linear(32, 3)})

        def train_dataloader(self) -> DataLoader:
            return loader

        def val_dataloader(self) -> DataLoader:
            return loader

    model = MyModule()

    def evaluate(module: nn.Module) -> float:
        module.eval()
        with torch.no_grad():
            return float((module(x).argmax(1) == y).float().mean())

    return {
        "model": model,
        "MyModule": MyModule,
        "loader": loader,
        "train_loader": loader,
        "val_loader": loader,
        "dm": L.LightningDataModule.from_datasets(dataset, dataset, batch_size=32),
        "loss_fn": F.cross_entropy,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "evaluate": evaluate,
    }


# ------------------------------------------------------------------------------------------------
# what the comments say, checked per page (block index on the page -> check)
# ------------------------------------------------------------------------------------------------
def _check_quickstart(ns: dict[str, Any], out: str, logs: str) -> None:
    assert out.strip().splitlines()[-1] == "checked 7 frozen tensors: 0 changed"


def _check_core(ns: dict[str, Any], out: str, logs: str) -> None:
    assert out.strip().splitlines()[-1] == "checked 7 frozen tensors: 0 changed"


def _check_verifier(ns: dict[str, Any], out: str, logs: str) -> None:
    assert out.strip().splitlines() == ["checked 7 frozen tensors: 0 changed", "['backbone']"]
    assert list(ns["verifier"].probes) == ["backbone"]


def _check_freeze_backbone(ns: dict[str, Any], out: str, logs: str) -> None:
    before = ns["_before"]
    after = ns["model"].backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _check_ema(ns: dict[str, Any], out: str, logs: str) -> None:
    averaged, model = ns["averaged"], ns["model"]
    assert set(averaged) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], averaged[k]) for k in averaged)  # the EMA, bitwise
    assert not model.training


def _check_trainable_ema(ns: dict[str, Any], out: str, logs: str) -> None:
    assert Path("ema.pt").is_file()


def _check_stages(ns: dict[str, Any], out: str, logs: str) -> None:
    assert logs.count("FreezeBackbone: checked 9 frozen tensors: 0 changed") >= 2  # stage 2, twice
    assert {Path(f"stage2_{n}.ckpt").is_file() for n in "bc"} == {True}


def _check_served(ns: dict[str, Any], out: str, logs: str) -> None:
    assert sorted(ns["outputs"]) == ["a", "b", "c"]


def _check_cache_stats(ns: dict[str, Any], out: str, logs: str) -> None:
    assert {"hits", "misses", "bytes", "hit_rate", "time_saved_s"} <= set(ns["cache"].stats)


CHECKS = {
    ("README.md", 0): _check_quickstart,
    ("docs/getting-started.md", 0): _check_quickstart,
    ("docs/core.md", 0): _check_core,
    ("docs/core.md", 1): _check_verifier,
    ("docs/freeze-backbone.md", 0): _check_freeze_backbone,
    ("docs/frozen-safe-ema.md", 0): _check_ema,
    ("docs/frozen-safe-ema.md", 1): _check_trainable_ema,
    ("docs/multibranch.md", 0): _check_stages,
    ("docs/multibranch.md", 1): _check_served,
    ("docs/feature-cache.md", 0): _check_cache_stats,
}


def _run_shell(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    """Run a shell block's ``lightning-freeze`` commands (in-process); compare shown output."""
    from lightning_freeze.cli.checkpoint_tools import main as checkpoint_tool

    commands: list[tuple[str, list[str]]] = []  # (command, the output lines shown after it)
    for raw in block.code.splitlines():
        if block.lang == "console" and not raw.startswith("$ "):
            commands[-1][1].append(raw)
            continue
        commands.append((raw.removeprefix("$ "), []))
    for command, shown in commands:
        line, _, comment = command.partition("  #")
        argv = shlex.split(line)
        assert argv[0] == "lightning-freeze", f"{block.page}:{block.line}: mark `{line}` as tested or skipped"
        capsys.readouterr()
        code = checkpoint_tool(argv[1:])
        captured = capsys.readouterr()
        printed = captured.out + captured.err  # what a terminal shows
        expected = 0 if "exit 0" in comment or block.lang == "bash" else None
        if expected is not None:
            assert code == expected, (command, printed)
        if shown:
            assert printed.rstrip("\n").splitlines() == shown, (command, printed)


def _cases() -> list[Any]:
    return [pytest.param(page, id=page) for page in PAGES if _blocks(page)]


#: pages whose examples continue another page's (the checkpoint tools read the stage checkpoints that
#: docs/multibranch.md writes)
CONTINUES = {"docs/checkpoint-tools.md": "docs/multibranch.md"}


def _run_page(
    page: str,
    namespace: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    skipped: list[str],
    *,
    setup_only: bool = False,
) -> None:
    """Run the page's blocks in order (``setup_only``: its Python blocks before the first shell block)."""
    if page in CONTINUES:
        _run_page(CONTINUES[page], namespace, capsys, caplog, skipped, setup_only=True)
    python_index = 0
    for block in _blocks(page):
        if setup_only and block.lang != "python":
            return
        if block.mark and block.mark[0] == "skip":
            skipped.append(f"{block.page}:{block.line}: {block.mark[1]}")
            python_index += block.lang == "python"
            continue
        if block.mark and block.mark[0] == "tested":
            for test in block.mark[1].split(","):
                file, _, name = test.strip().partition("::")
                assert f"def {name}(" in (REPO / file).read_text(), f"{block.page}:{block.line}: {test}"
            continue
        if block.lang == "python":
            caplog.clear()
            capsys.readouterr()
            exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
            out = capsys.readouterr().out
            check = CHECKS.get((page, python_index))
            if check is not None:
                check(namespace, out, caplog.text)
            python_index += 1
        elif block.lang in ("bash", "sh", "console"):
            _run_shell(block, capsys)
    unchecked = [k for k in CHECKS if k[0] == page and k[1] >= python_index]
    assert not unchecked, f"checks of blocks that are no longer there: {unchecked}"


@pytest.mark.parametrize("page", _cases())
def test_every_example_of_the_page_runs_and_does_what_it_says(
    page: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)  # checkpoints, caches and logs of the examples go here
    caplog.set_level(logging.INFO)
    namespace = _fixtures()
    namespace["_before"] = {k: v.clone() for k, v in namespace["model"].backbone.state_dict().items()}
    skipped: list[str] = []
    _run_page(page, namespace, capsys, caplog, skipped)  # skipped blocks: reported by the next test


def _skipped_blocks() -> list[Any]:
    cases = []
    for page in PAGES:
        for block in _blocks(page):
            if block.mark and block.mark[0] == "skip":
                reason = block.mark[1]
            else:
                continue
            cases.append(pytest.param(reason, id=f"{page}:{block.line}"))
    return cases


@pytest.mark.parametrize("reason", _skipped_blocks())
def test_a_marked_block_is_skipped_with_its_reason(reason: str) -> None:
    assert reason.strip(), "a skip marker needs a reason"
    pytest.skip(reason)


def test_every_shell_block_runs_here_or_is_marked() -> None:
    runnable = ("lightning-freeze ", "$ lightning-freeze ")
    unmarked = []
    for page in PAGES:
        for block in _blocks(page):
            if block.lang not in ("bash", "sh", "shell", "console") or block.mark:
                continue
            lines = [line for line in block.code.splitlines() if line.strip()]
            if block.lang == "console":
                lines = [line for line in lines if line.startswith("$ ")]
            if not all(line.startswith(runnable) for line in lines):
                unmarked.append(f"{page}:{block.line}")
    assert not unmarked, f"shell blocks neither run by test_docs.py nor marked: {unmarked}"


def test_every_fence_has_a_language() -> None:
    bare = [f"{page}:{b.line}" for page in PAGES for b in _blocks(page) if not b.lang]
    assert not bare, bare


def test_the_quickstart_is_the_same_in_readme_and_getting_started() -> None:
    (example,) = _python_blocks(README)
    assert example in _python_blocks((REPO / "docs" / "getting-started.md").read_text())


def test_readme_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/getting-started.md" in local and "LICENSE" in local
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, missing
