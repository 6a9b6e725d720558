"""``lightning-freeze select``: the best variant per branch by a stored validation metric."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from helpers.multibranch import loader, make_backbone, make_branch, trainer

from lightning_freeze import FreezeBackbone, MultiBranchModule
from lightning_freeze.cli.select import main as select

LRS = (0.0005, 0.05, 0.005)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Three checkpoints of branch "b" (lr variants) on one frozen backbone with frozen branch "a"."""
    root = tmp_path_factory.mktemp("select")
    torch.manual_seed(0)
    initial = MultiBranchModule(
        make_backbone(), {"a": make_branch("a"), "b": make_branch("b")}, active_branch="b"
    )
    paths, val_losses = [], []
    for i, lr in enumerate(LRS):
        model = copy.deepcopy(initial)
        model._optimizer_factory = functools.partial(torch.optim.AdamW, lr=lr)
        fit = trainer(root / str(i), callbacks=[FreezeBackbone()])
        torch.manual_seed(1)
        fit.fit(model, loader("b"), loader("b", 32, 1, False))
        paths.append(root / f"v{i}.ckpt")
        fit.save_checkpoint(paths[-1])
        val_losses.append(float(fit.callback_metrics["b/val_loss"]))
    return root, paths, val_losses


def test_select_keeps_the_variant_with_the_best_metric_and_loads_like_any_checkpoint(
    variants, capsys
) -> None:
    root, paths, val_losses = variants
    assert len(set(val_losses)) == 3
    best = min(range(3), key=val_losses.__getitem__)
    out = root / "best.ckpt"
    assert select([str(out), *map(str, paths), "--metric", "val_loss", "--mode", "min"]) == 0
    assert "b: best min of [" in capsys.readouterr().out
    merged = torch.load(out, weights_only=True)
    winner = torch.load(paths[best], weights_only=True)
    assert set(merged["state_dict"]) == set(winner["state_dict"])
    for key, value in winner["state_dict"].items():  # backbone, frozen "a" and the winning "b"
        assert torch.equal(merged["state_dict"][key], value), key
    assert merged["multi_branch"]["selected"]["b"]["value"] == pytest.approx(val_losses[best])
    assert merged["multi_branch"]["metrics"]["b/val_loss"] == pytest.approx(val_losses[best])
    # loads like any other checkpoint
    fresh = MultiBranchModule(make_backbone(), {"a": make_branch("a"), "b": make_branch("b")})
    assert fresh.init_from_checkpoint(out) == []
    for key, value in winner["state_dict"].items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # the best by accuracy (max), via BRANCH/NAME
    accs = [torch.load(p, weights_only=True)["multi_branch"]["metrics"]["b/val_acc"] for p in paths]
    assert select([str(root / "acc.ckpt"), *map(str, paths), "--metric", "b/val_acc"]) == 0
    first_best = accs.index(max(accs))
    chosen = torch.load(root / "acc.ckpt", weights_only=True)["state_dict"]["branches.b.0.weight"]
    assert torch.equal(
        chosen, torch.load(paths[first_best], weights_only=True)["state_dict"]["branches.b.0.weight"]
    )


def test_select_reads_the_jobs_summary_json_when_the_checkpoint_stores_no_metrics(variants, tmp_path) -> None:
    _, paths, _ = variants
    inputs = []
    for i, (path, loss) in enumerate(zip(paths, (0.9, 0.2, 0.5), strict=True)):
        checkpoint = torch.load(path, weights_only=True)
        del checkpoint["multi_branch"]["metrics"]
        job = tmp_path / f"job{i}"
        (job / "checkpoints").mkdir(parents=True)
        torch.save(checkpoint, job / "checkpoints" / "last.ckpt")
        rows = [{"name": "a", "val_loss": 1.0}, {"name": "b", "val_loss": loss}]
        (job / "summary.json").write_text(json.dumps({"branches": rows}))
        inputs.append(str(job / "checkpoints" / "last.ckpt"))
    assert select([str(tmp_path / "out.ckpt"), *inputs, "--metric", "val_loss", "--mode", "min"]) == 0
    chosen = torch.load(tmp_path / "out.ckpt", weights_only=True)["state_dict"]["branches.b.0.weight"]
    assert torch.equal(chosen, torch.load(paths[1], weights_only=True)["state_dict"]["branches.b.0.weight"])


def test_select_refuses_bad_input_with_one_line_and_writes_nothing(variants, tmp_path, capsys) -> None:
    _, paths, _ = variants
    out = tmp_path / "out.ckpt"
    assert select([str(out), *map(str, paths), "--metric", "val_f1"]) == 2
    err = capsys.readouterr().err
    assert "holds branch 'b' but no metric 'b/val_f1'; its metrics: " in err and "b/val_acc" in err
    assert select([str(out), *map(str, paths), "--metric", "val_acc", "--branch", "z"]) == 2
    assert "Unknown branch(es) 'z'; valid choices: 'a', 'b'" in capsys.readouterr().err
    assert select([str(out), str(paths[0]), str(paths[0]), "--metric", "val_acc"]) == 2
    assert "bitwise identical in all inputs: there is no variant to choose" in capsys.readouterr().err
    # another backbone: refused as merge refuses it
    other = torch.load(paths[1], weights_only=True)
    other["state_dict"]["backbone.0.weight"] = other["state_dict"]["backbone.0.weight"] + 1
    torch.save(other, tmp_path / "other.ckpt")
    assert select([str(out), str(paths[0]), str(tmp_path / "other.ckpt"), "--metric", "val_acc"]) == 2
    assert "backbones are not bitwise identical" in capsys.readouterr().err
    assert not out.exists()
