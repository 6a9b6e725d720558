"""The staged workflow end to end: stage 1 (backbone + a), stage 2 (b, then c, in parallel from the same
stage-1 checkpoint, backbone and a frozen), merge, and one model serving every branch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.multibranch import (
    Stage,
    fixed_batch,
    loader,
    make_backbone,
    make_branch,
    make_module,
    outputs,
    run_stage1,
    run_stage2,
    trainer,
)
from torch import nn

from lightning_freeze import FreezeBackbone, FrozenSafeEMA, MultiBranchModule, load_ema_weights
from lightning_freeze.cli.checkpoint_tools import main as cli
from lightning_freeze.core.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    ema_state_dict,
    load_checkpoint,
    tensors_bitwise_equal,
)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Stage | Path]:
    root = tmp_path_factory.mktemp("stages")
    stage1 = run_stage1(root)
    return {
        "stage1": stage1,
        "b": run_stage2(root, stage1, "b", seed=1),
        "c": run_stage2(root, stage1, "c", seed=2),
    }


def _load(path: Path, names: list[str]) -> MultiBranchModule:
    return MultiBranchModule.load_from_checkpoint(
        path, backbone=make_backbone(), branches={n: make_branch(n) for n in names}
    )


def test_stage2_leaves_backbone_and_branch_a_bitwise_identical(stages) -> None:
    stage1 = _load(stages["stage1"], ["a"])
    x = fixed_batch()
    expected_a = outputs(stage1, x)["a"]
    reference = stage1.state_dict()
    for name in ("b", "c"):
        stage: Stage = stages[name]
        state = stage.model.state_dict()
        # every tensor of stage 1 (backbone incl. BatchNorm statistics, branch a) is bitwise unchanged
        assert set(reference) < set(state)
        changed = [k for k, v in reference.items() if not tensors_bitwise_equal(v, state[k])]
        assert changed == []
        assert torch.equal(outputs(stage.model, x)["a"], expected_a)
        # ...while the new branch trained: its weights moved and its held-out loss went down
        assert not torch.equal(
            state[f"branches.{name}.0.weight"], stage.initial_state[f"branches.{name}.0.weight"]
        )
        # at least 10 % lower (measured: 0.58-0.73 of the initial loss on torch 2.14, 0.59-0.83 on the
        # torch 2.6 floor, where the same seeds draw other numbers)
        assert stage.val_loss < 0.9 * stage.initial_val_loss


def test_diff_proves_the_stage_left_the_backbone_untouched(stages, capsys) -> None:
    stage1, stage2 = stages["stage1"], stages["b"].path
    assert cli(["diff", str(stage1), str(stage2), "--only", "backbone", "--only", "branches.a"]) == 0
    assert "no differences: all 18 tensors under 'backbone', 'branches.a' are bitwise identical" in (
        capsys.readouterr().out
    )
    assert cli(["diff", str(stage1), str(stage2)]) == 1
    out = capsys.readouterr().out
    assert "branches.b.0.weight" in out and "only in B" in out
    assert "9 of 27 tensors differ (9 only in B); 18 bitwise identical" in out


def test_parallel_branches_merged_reproduce_each_source_exactly(stages, tmp_path, capsys) -> None:
    merged = tmp_path / "merged.ckpt"
    assert cli(["merge", str(merged), str(stages["b"].path), str(stages["c"].path)]) == 0
    assert "merged 3 branch(es) on one shared backbone" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.ckpt"]  # no temporary file left

    x = fixed_batch()
    stage1 = outputs(_load(stages["stage1"], ["a"]), x)
    stage_b, stage_c = outputs(stages["b"].model, x), outputs(stages["c"].model, x)

    served = make_module(["a", "b", "c"])
    assert served.init_from_checkpoint(merged) == []  # nothing fresh: every branch came from the file
    all_outputs = outputs(served, x)
    assert torch.equal(all_outputs["a"], stage1["a"])
    assert torch.equal(all_outputs["b"], stage_b["b"])
    assert torch.equal(all_outputs["c"], stage_c["c"])

    loaded = _load(merged, ["a", "b", "c"])
    assert loaded.branch_names == ["a", "b", "c"]
    assert all(torch.equal(outputs(loaded, x)[n], all_outputs[n]) for n in ("a", "b", "c"))
    assert torch.load(merged, weights_only=True)["multi_branch"]["branch_names"] == ["a", "b", "c"]

    # a stage 3 can start from the merged checkpoint: only the new branch is fresh
    assert make_module(["a", "b", "c", "d"], active="d").init_from_checkpoint(merged) == ["d"]


def test_init_from_checkpoint_mismatches_are_errors_naming_the_keys(stages, tmp_path) -> None:
    stage1 = stages["stage1"]
    # a branch the checkpoint holds but the module lacks would be lost: refused
    model = MultiBranchModule(make_backbone(), {"b": make_branch("b")})
    with pytest.raises(CheckpointMismatchError, match=r"branch\(es\) 'a' that this module lacks .*'b'"):
        model.init_from_checkpoint(stage1)
    # a branch of another shape
    model = MultiBranchModule(make_backbone(), {"a": make_branch("c")})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape/dtype differs: branches\.a\.3\.weight \(checkpoint \(3, 16\) float32",
    ):
        model.init_from_checkpoint(stage1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing half-loaded
    # a backbone with a layer the checkpoint does not have
    model = MultiBranchModule(nn.Sequential(*make_backbone(), nn.Linear(16, 16)), {"a": make_branch("a")})
    with pytest.raises(
        CheckpointMismatchError, match=r"missing from the checkpoint: backbone\.6\.weight, backbone\.6\.bias"
    ):
        model.init_from_checkpoint(stage1)
    # ...or lacks one it has
    model = MultiBranchModule(make_backbone()[:4], {"a": make_branch("a")})
    with pytest.raises(
        CheckpointMismatchError, match=r"not in this module: backbone\.4\.weight, backbone\.4\.bias"
    ):
        model.init_from_checkpoint(stage1)
    with pytest.raises(CheckpointError, match=r"no such file"):
        model.init_from_checkpoint(tmp_path / "missing.ckpt")

    # a plain state_dict file works too
    plain = tmp_path / "weights.pt"
    torch.save(_load(stage1, ["a"]).state_dict(), plain)
    model = make_module(["a", "b"], active="b")
    assert model.init_from_checkpoint(plain) == ["b"]
    assert torch.equal(model.state_dict()["backbone.0.weight"], torch.load(plain)["backbone.0.weight"])


def test_stages_with_frozen_safe_ema_build_on_the_averaged_weights(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    stage1 = make_module(["a"])
    fit = trainer(tmp_path / "s1", callbacks=[FrozenSafeEMA(decay=0.9)])
    fit.fit(stage1, loader("a"))
    path1 = tmp_path / "stage1.ckpt"
    fit.save_checkpoint(path1)
    averaged = ema_state_dict(load_checkpoint(path1))
    raw = load_checkpoint(path1)["state_dict"]
    assert not torch.equal(averaged["backbone.0.weight"], raw["backbone.0.weight"])  # the EMA is not raw

    torch.manual_seed(1)
    stage2 = make_module(["a", "b"], active="b")
    assert stage2.init_from_checkpoint(path1, weights="ema") == ["b"]
    with pytest.raises(ValueError, match=r"Invalid weights='best'; valid choices: 'raw', 'ema'"):
        stage2.init_from_checkpoint(path1, weights="best")
    fit = trainer(tmp_path / "s2", callbacks=[FreezeBackbone(), FrozenSafeEMA(decay=0.9)])
    fit.fit(stage2, loader("b"), loader("b", n=32, seed=1, shuffle=False))
    path2 = tmp_path / "stage2.ckpt"
    fit.save_checkpoint(path2)

    # stage 2 trained on exactly the stage-1 EMA weights, and kept them bitwise
    state = stage2.state_dict()
    assert all(tensors_bitwise_equal(state[k], v) for k, v in averaged.items())
    x = fixed_batch()
    served_stage1 = load_ema_weights(make_module(["a"]), path1)
    assert torch.equal(outputs(stage2, x)["a"], outputs(served_stage1, x)["a"])
    # the CLI proves it from the files alone
    assert cli(["diff", str(path1), str(path2), "--ema", "--only", "backbone", "--only", "branches.a"]) == 0
    assert cli(["diff", str(path1), str(path2), "--only", "backbone"]) == 1  # raw stage 1 vs EMA start
    # a file without EMA state cannot be read with --ema
    plain = tmp_path / "plain.pt"
    torch.save(stage2.state_dict(), plain)
    capsys.readouterr()
    assert cli(["diff", str(path1), str(plain), "--ema"]) == 2
    assert (
        "holds 0 FrozenSafeEMA states []; was it trained with a FrozenSafeEMA callback?"
        in capsys.readouterr().err
    )
