"""``launcher=packed``: a sweep over branch-level settings trains in one process, each job as if alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.app import run_app, run_app_ok

FAST = ["quiet=true", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]
LRS = "0.001,0.01,0.1"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Stage 1, then one stage-2 lr sweep (with FrozenSafeEMA) packed and the same sweep job by job."""
    root = tmp_path_factory.mktemp("packed_launcher")
    run_app_ok(["experiment=stage1", f"hydra.run.dir={root / 's1'}", *FAST], root)
    stage1 = root / "s1" / "checkpoints" / "last.ckpt"
    sweep = [
        "-m",
        "experiment=stage2",
        f"init_from={stage1}",
        f"model.optimizer.lr={LRS}",
        "callbacks=[default,freeze_backbone,ema]",
        "callbacks.ema.decay=0.9",
        "trainer.deterministic=true",
        *FAST,
    ]
    packed = run_app_ok([*sweep, "launcher=packed", f"hydra.sweep.dir={root / 'packed'}"], root)
    run_app_ok([*sweep, "launcher=basic", f"hydra.sweep.dir={root / 'basic'}"], root)
    return {"root": root, "packed_log": packed.stdout + packed.stderr}


def _checkpoint(root: Path, job: int) -> dict:
    return torch.load(root / f"{job}_parity" / "checkpoints" / "last.ckpt", weights_only=False)


def _differences(a, b, path_a: str, path_b: str, where: str = "") -> list[str]:
    """Where two checkpoints differ (tensors bitwise; paths of A read with B's sweep directory)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in _differences(a[k], b[k], path_a, path_b, f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, path_a, path_b, f"{where}[{i}]")
        ]
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, str) and isinstance(b, str):
        a = a.replace(path_a, path_b)
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def test_packed_sweep_writes_each_jobs_outputs_bitwise_as_the_job_alone(sweeps) -> None:
    root = sweeps["root"]
    assert "launcher=packed: training 3 jobs as packed variants in one process" in sweeps["packed_log"]
    assert sorted(p.name for p in (root / "packed").iterdir() if p.name[0].isdigit()) == [
        "0_parity",
        "1_parity",
        "2_parity",
    ]
    branch_weights = []
    for job in range(3):
        alone, packed = _checkpoint(root / "basic", job), _checkpoint(root / "packed", job)
        # the whole checkpoint: every tensor (backbone, frozen digit branch, the job's parity variant and
        # its BatchNorm buffers), hyper-parameters, the app's record, loops, the optimizer state of the
        # job's lr, the EMA shadow of its variant only, FreezeBackbone's fingerprints, stored metrics
        differences = _differences(alone, packed, str(root / "basic"), str(root / "packed"))
        assert differences == [], differences[:5]
        (group,) = packed["optimizer_states"][0]["param_groups"]
        assert group["lr"] == float(LRS.split(",")[job])
        ema_key = next(k for k in packed["callbacks"] if k.startswith("FrozenSafeEMA"))
        assert all(k.startswith("branches.parity.") for k in packed["callbacks"][ema_key]["ema"]["shadow"])
        branch_weights.append(packed["state_dict"]["branches.parity.weight"])
        # the summary the sweeper and the user read
        summary_alone = json.loads((root / "basic" / f"{job}_parity" / "summary.json").read_text())
        summary_packed = json.loads((root / "packed" / f"{job}_parity" / "summary.json").read_text())
        for key in ("stage", "trained_branch", "branches", "frozen_check", "frozen_changed"):
            assert summary_packed[key] == summary_alone[key], key
        assert summary_packed["checkpoint"] == str(
            root / "packed" / f"{job}_parity" / "checkpoints" / "last.ckpt"
        )
        assert (root / "packed" / f"{job}_parity" / ".hydra" / "overrides.yaml").is_file()
    assert not torch.equal(branch_weights[0], branch_weights[2])  # the lr made a difference


def test_select_picks_the_best_packed_variant(sweeps) -> None:
    from lightning_freeze.cli.select import main as select

    root = sweeps["root"]
    inputs = [str(root / "packed" / f"{job}_parity" / "checkpoints" / "last.ckpt") for job in range(3)]
    scores = [json.loads((root / "packed" / f"{j}_parity" / "summary.json").read_text()) for j in range(3)]
    losses = [next(r["val_loss"] for r in s["branches"] if r["name"] == "parity") for s in scores]
    out = root / "best.ckpt"
    assert select([str(out), *inputs, "--metric", "val_loss", "--mode", "min"]) == 0
    best = losses.index(min(losses))
    assert torch.equal(
        torch.load(out, weights_only=True)["state_dict"]["branches.parity.weight"],
        torch.load(inputs[best], weights_only=False)["state_dict"]["branches.parity.weight"],
    )


def test_a_sweep_that_is_not_branch_level_falls_back_to_one_job_after_another(sweeps) -> None:
    root = sweeps["root"]
    stage1 = root / "s1" / "checkpoints" / "last.ckpt"
    result = run_app_ok(
        [
            "-m",
            "launcher=packed",
            "experiment=stage2",
            f"init_from={stage1}",
            f"hydra.sweep.dir={root / 'fallback'}",
            *FAST[:-2],
            "trainer.limit_train_batches=1,2",
            "trainer.limit_val_batches=1",
        ],
        root,
    )
    log = result.stdout + result.stderr
    assert (
        "launcher=packed: running 2 job(s) one after another: the jobs differ in "
        "trainer.limit_train_batches, not only in branch-level settings" in log
    )
    for job in range(2):
        summary = json.loads((root / "fallback" / f"{job}_parity" / "summary.json").read_text())
        assert summary["trained_branch"] == "parity" and summary["checkpoint"]


def test_jobs_whose_checkpointing_packing_cannot_reproduce_fall_back(sweeps) -> None:
    root = sweeps["root"]
    stage1 = root / "s1" / "checkpoints" / "last.ckpt"
    result = run_app_ok(
        [
            "-m",
            "launcher=packed",
            "experiment=stage2",
            f"init_from={stage1}",
            f"hydra.sweep.dir={root / 'monitored'}",
            "model.optimizer.lr=0.01,0.1",
            "callbacks.model_checkpoint.monitor=parity/val_acc",
            "callbacks.model_checkpoint.mode=max",
            *FAST,
        ],
        root,
    )
    log = result.stdout + result.stderr
    assert "launcher=packed: running 2 job(s) one after another: job 0: its ModelCheckpoint saves by" in log
    for job in range(2):
        assert (root / "monitored" / f"{job}_parity" / "summary.json").is_file()


def test_jobs_that_resume_a_checkpoint_fall_back(sweeps) -> None:
    # packed variants start fresh: a sweep resuming a run (ckpt_path) runs its jobs one by one
    root = sweeps["root"]
    resumed = root / "basic" / "0_parity" / "checkpoints" / "last.ckpt"
    result = run_app_ok(
        [
            "-m",
            "launcher=packed",
            "experiment=stage2",
            f"init_from={root / 's1' / 'checkpoints' / 'last.ckpt'}",
            f"ckpt_path={resumed}",
            f"hydra.sweep.dir={root / 'resumed'}",
            "model.optimizer.lr=0.01,0.1",
            "callbacks=[default,freeze_backbone,ema]",
            *FAST,
        ],
        root,
    )
    log = result.stdout + result.stderr
    assert f"running 2 job(s) one after another: job 0 resumes from {resumed}; packed jobs start fresh" in log
    for job in range(2):
        summary = json.loads((root / "resumed" / f"{job}_parity" / "summary.json").read_text())
        assert summary["resumed_from"] == str(resumed)


def test_a_dropout_head_sweep_writes_bitwise_what_each_job_writes_alone(sweeps) -> None:
    # each variant trains in its own random stream, seeded as the job's branch is when the job runs
    # alone: before, the dropout variants shared the global stream, and 4 of 24 tensors differed
    root = sweeps["root"]
    sweep = [
        "-m",
        "experiment=stage2",
        f"init_from={root / 's1' / 'checkpoints' / 'last.ckpt'}",
        "model.optimizer.lr=0.01,0.1",
        "branch.head._target_=lightning_freeze.models.mlp_head",
        "+branch.head.dropout=0.5",
        "trainer.deterministic=true",
        *FAST,
    ]
    packed = run_app_ok([*sweep, "launcher=packed", f"hydra.sweep.dir={root / 'dropout_packed'}"], root)
    assert (
        "launcher=packed: training 2 jobs as packed variants in one process" in packed.stdout + packed.stderr
    )
    run_app_ok([*sweep, "launcher=basic", f"hydra.sweep.dir={root / 'dropout_basic'}"], root)
    for job in range(2):
        alone = _checkpoint(root / "dropout_basic", job)
        packed_ckpt = _checkpoint(root / "dropout_packed", job)
        head = alone["hyper_parameters"]["branches"]["parity"]
        assert head["_target_"] == "lightning_freeze.models.mlp_head" and head["dropout"] == 0.5
        differences = _differences(
            alone, packed_ckpt, str(root / "dropout_basic"), str(root / "dropout_packed")
        )
        assert differences == [], differences[:5]
        assert "parity" in packed_ckpt["multi_branch"]["random_streams"]


def test_an_early_stopping_sweep_falls_back_in_one_line_and_never_crashes(sweeps) -> None:
    # EarlyStopping monitors parity/val_loss, which packed variants log as parity__v0/val_loss: before,
    # the packed fit crashed after epoch 1 ("Early stopping conditioned on metric ... not available")
    root = sweeps["root"]
    result = run_app_ok(
        [
            "-m",
            "launcher=packed",
            "experiment=stage2",
            f"init_from={root / 's1' / 'checkpoints' / 'last.ckpt'}",
            f"hydra.sweep.dir={root / 'early'}",
            "model.optimizer.lr=0.01,0.1",
            "callbacks=[default,freeze_backbone,early_stopping]",
            *FAST,
        ],
        root,
    )
    log = result.stdout + result.stderr
    assert (
        "launcher=packed: running 2 job(s) one after another: job 0: its EarlyStopping monitors "
        "'parity/val_loss', which each packed variant logs under its own name" in log
    )
    assert log.count("launcher=packed:") == 1
    for job in range(2):
        summary = json.loads((root / "early" / f"{job}_parity" / "summary.json").read_text())
        assert summary["trained_branch"] == "parity" and summary["checkpoint"]


def test_the_docs_select_command_finds_the_checkpoints_the_docs_sweep_writes(sweeps, tmp_path) -> None:
    # main: docs/packed.md read multirun/.../*/checkpoints/last.ckpt, which the app never writes
    import glob
    import re
    import shlex

    from lightning_freeze.cli.select import main as select

    page = (Path(__file__).resolve().parents[1] / "docs" / "packed.md").read_text()
    (block,) = re.findall(r"^```bash\n(.*?)^```", page, flags=re.DOTALL | re.MULTILINE)
    sweep_line, select_line = (shlex.split(line) for line in block.strip().splitlines())
    assert sweep_line[:2] == ["lightning-freeze-train", "-m"] and "launcher=packed" in sweep_line
    sweep_dir = next(a.split("=", 1)[1] for a in sweep_line if a.startswith("hydra.sweep.dir="))
    # the fixture ran that sweep (with its own sweep dir and tiny sizes): put it where the docs' sweep writes
    (tmp_path / sweep_dir).symlink_to(sweeps["root"] / "packed")
    assert select_line[:3] == ["lightning-freeze", "select", "best.ckpt"]
    inputs = sorted(glob.glob(str(tmp_path / select_line[3])))
    assert [Path(p).parts[-3] for p in inputs] == ["0_parity", "1_parity", "2_parity"]
    assert select([str(tmp_path / "best.ckpt"), *inputs, *select_line[4:]]) == 0
    assert (tmp_path / "best.ckpt").is_file()


def _with_data_target(stage1: Path, out: Path, data: dict, *, replace: bool) -> Path:
    """A copy of the stage-1 checkpoint (and its settings file) with ``data`` as its branch's recorded data.

    ``replace``: the whole data config is ``data``; else ``data`` updates the recorded one.
    """
    from lightning_freeze.stages import RECORD_KEY

    out.mkdir(parents=True)
    ckpt = torch.load(stage1, weights_only=False)
    (entry,) = ckpt[RECORD_KEY]["branches"].values()
    entry["data"] = dict(data) if replace else {**entry["data"], **data}
    torch.save(ckpt, out / "last.ckpt")
    (out / "stage_settings.yaml").write_text((stage1.parent / "stage_settings.yaml").read_text())
    return out / "last.ckpt"


def test_a_packed_sweep_never_instantiates_a_refused_target_from_init_from(sweeps, tmp_path) -> None:
    created = tmp_path / "created_by_the_checkpoint.txt"
    evil = {"_target_": "builtins.open", "file": str(created), "mode": "w"}
    stage1 = sweeps["root"] / "s1" / "checkpoints" / "last.ckpt"
    evil_ckpt = _with_data_target(stage1, tmp_path / "evil", evil, replace=True)
    sweep = ["-m", "experiment=stage2", f"init_from={evil_ckpt}", "model.optimizer.lr=0.001,0.01", *FAST]
    result = run_app([*sweep, "launcher=packed", f"hydra.sweep.dir={tmp_path / 'packed'}"], tmp_path)
    out = result.stdout + result.stderr
    assert not created.exists()
    assert result.returncode == 1
    # the build refuses it (the sweep falls back), and the first job reports it in one line, as the app does
    assert "launcher=packed: running 2 job(s) one after another: job 0 could not be built (Refused to " in out
    assert "Error: Refused to instantiate data of " in out and "_target_='builtins.open'" in out


def test_a_packed_sweep_applies_the_runs_allow_targets(sweeps, tmp_path) -> None:
    ours = {"_target_": "helpers.packed_data.digits"}  # outside the default allow-list
    stage1 = sweeps["root"] / "s1" / "checkpoints" / "last.ckpt"
    ckpt = _with_data_target(stage1, tmp_path / "ours", ours, replace=False)
    sweep = ["-m", "experiment=stage2", f"init_from={ckpt}", "model.optimizer.lr=0.001,0.01", *FAST]
    allow = "allow_targets=[helpers.packed_data]"
    result = run_app_ok([*sweep, allow, "launcher=packed", f"hydra.sweep.dir={tmp_path / 'p'}"], tmp_path)
    out = result.stdout + result.stderr
    assert "launcher=packed: training 2 jobs as packed variants in one process" in out
    summary = json.loads((tmp_path / "p" / "0_parity" / "summary.json").read_text())
    (frozen,) = [row for row in summary["branches"] if row["status"] == "frozen"]
    assert frozen["val_acc"] is not None  # validated on the data built by helpers.packed_data.digits
