"""The training app from the command line: stages, multirun, DDP, the wheel, bad input.

Most runs call the console script's function in this process (:func:`helpers.app.run_app`); a fresh
process (:func:`_app`) only where the process is what is tested: DDP re-running the command line,
ddp_spawn workers, joblib workers, the installed wheel's script, ``--help`` without torch and
``HYDRA_FULL_ERROR``'s traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.app import run_app, run_app_ok

import lightning_freeze

REPO = Path(lightning_freeze.__file__).resolve().parent.parent
FAST = ["quiet=true", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2"]


def _env(pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath if pythonpath is not None else str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _app(args: list[str], cwd: Path, *, command: list[str] | None = None, env=None, timeout: float = 300):
    command = command or [sys.executable, "-m", "lightning_freeze.train"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stage 1 then stage 2 through the CLI (2 epochs each)."""
    root = tmp_path_factory.mktemp("stages")
    args = ["quiet=true", "trainer.max_epochs=2"]
    run_app_ok(["experiment=stage1", f"hydra.run.dir={root / 's1'}", *args], root)
    s1 = root / "s1" / "checkpoints" / "last.ckpt"
    result = run_app_ok(["experiment=stage2", f"init_from={s1}", f"hydra.run.dir={root / 's2'}", *args], root)
    (root / "s2_stdout.txt").write_text(result.stdout)
    return {"root": root, "s1": s1, "s2": root / "s2" / "checkpoints" / "last.ckpt"}


def test_stage2_freezes_backbone_and_earlier_branch_and_summarises(stages: dict[str, Path]) -> None:
    out = (stages["root"] / "s2_stdout.txt").read_text()
    s1, s2 = _state(stages["s1"]), _state(stages["s2"])
    frozen = [k for k in s1 if k.startswith(("backbone.", "branches.digit."))]
    assert frozen and all(torch.equal(s1[k], s2[k]) for k in frozen)
    assert any(k.startswith("branches.parity.") for k in s2)
    summary = json.loads((stages["root"] / "s2" / "summary.json").read_text())
    n_frozen = len(frozen)
    assert summary["frozen_check"] == f"checked {n_frozen} frozen tensors: 0 changed"
    assert f"frozen tensors: checked {n_frozen} frozen tensors: 0 changed" in out
    assert f"checkpoint: {stages['s2']}" in out
    # the frozen branch scores exactly what it scored after stage 1, on the same data
    stage1 = json.loads((stages["root"] / "s1" / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["branches"]}
    assert rows["digit"]["status"] == "frozen" and rows["parity"]["status"] == "trained"
    assert rows["digit"]["val_acc"] == stage1["branches"][0]["val_acc"]
    assert out.count("summary (trained branch: parity)") == 1


def test_multirun_trains_two_branches_in_parallel_and_they_merge(stages: dict[str, Path]) -> None:
    from lightning_freeze.cli.checkpoint_tools import main as checkpoint_tool

    root = stages["root"]
    sweep = root / "sweep"
    args = ["-m", "launcher=joblib", "experiment=stage3", f"init_from={stages['s2']}", "branch=mod3,high"]
    result = _ok(_app([*args, f"hydra.sweep.dir={sweep}", *FAST], root))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_mod3", "1_high"]
    assert result.stdout.count("frozen tensors: checked 22 frozen tensors: 0 changed") == 2
    merged = root / "merged.ckpt"
    inputs = [str(sweep / job / "checkpoints" / "last.ckpt") for job in ("0_mod3", "1_high")]
    assert checkpoint_tool(["merge", str(merged), *inputs]) == 0
    from lightning_freeze.train import load_model

    model = load_model(merged)
    assert model.branch_names == ["digit", "parity", "mod3", "high"]
    s1 = _state(stages["s1"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in s1.items())


@pytest.mark.distributed
def test_ddp_cpu_from_the_command_line(stages: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "ddp"
    args = [
        "experiment=stage2",
        f"init_from={stages['s1']}",
        "trainer=ddp_cpu",
        f"hydra.run.dir={run_dir}",
        *FAST,
    ]
    result = _ok(_app(args, tmp_path, timeout=400))
    # one summary (rank 0), one output directory shared by both processes
    assert result.stdout.count("summary (trained branch: parity)") == 1
    assert "checked 20 frozen tensors: 0 changed" in result.stdout
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["ddp"]
    assert {"train.log", "train_ddp_process_1.log", "summary.json", ".hydra"} <= {
        p.name for p in run_dir.iterdir()
    }
    s1, s2 = _state(stages["s1"]), _state(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.distributed
def test_ddp_spawn_summary_reports_the_check_the_workers_ran(stages: dict[str, Path], tmp_path: Path) -> None:
    # ddp_spawn: FreezeBackbone runs in the spawned workers and only the weights come back; the
    # summary must still report the frozen check, and the main process must have made it
    run_dir = tmp_path / "spawn"
    args = [
        "experiment=stage2",
        f"init_from={stages['s1']}",
        "trainer.strategy=ddp_spawn",
        "trainer.devices=2",
    ]
    result = _ok(_app([*args, f"hydra.run.dir={run_dir}", *FAST], tmp_path, timeout=500))
    s1, s2 = _state(stages["s1"]), _state(run_dir / "checkpoints" / "last.ckpt")
    frozen = [k for k in s1 if k.startswith(("backbone.", "branches.digit."))]
    assert all(torch.equal(s1[k], s2[k]) for k in frozen)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["frozen_check"] == f"checked {len(frozen)} frozen tensors: 0 changed"
    assert summary["frozen_check_by"] == "main process" and summary["frozen_changed"] == 0
    assert summary["backbone"] == "frozen"
    assert [(r["name"], r["status"]) for r in summary["branches"]] == [
        ("digit", "frozen"),
        ("parity", "trained"),
    ]
    assert (
        f"frozen tensors: checked {len(frozen)} frozen tensors: 0 changed (checked by the main process)"
        in (result.stdout)
    )
    assert "no FreezeBackbone callback" not in result.stdout


def test_a_run_that_fails_before_writing_anything_leaves_no_output_directory(tmp_path: Path) -> None:
    result = run_app(["stage=0", "quiet=true", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1 and "Error: Invalid stage=0" in result.stderr
    assert not (tmp_path / "run").exists()
    # a directory with anything else in it is the user's: kept as it is
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    result = run_app(["stage=0", "quiet=true", f"hydra.run.dir={mine}"], tmp_path)
    assert result.returncode == 1
    assert (mine / "notes.txt").read_text() == "keep me\n"


def test_local_multirun_refuses_subprocess_ddp(stages: dict[str, Path], tmp_path: Path) -> None:
    args = ["-m", "experiment=stage2", f"init_from={stages['s1']}", "trainer=ddp_cpu", "branch=mod3,high"]
    result = run_app([*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", *FAST], tmp_path)
    assert result.returncode != 0
    assert "cannot run inside a local multirun (-m)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_app_runs_from_the_installed_wheel(tmp_path: Path, dists: dict[str, Path]) -> None:
    # the wheel's contents (conf/, data) are checked in test_packaging.py; here: the app runs from it
    wheel = dists["wheel"]
    pip = [sys.executable, "-m", "pip"]
    target = tmp_path / "site"
    _ok(
        subprocess.run(
            [*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    )

    # a user's own config directory next to the packaged one
    user_conf = tmp_path / "myconf" / "branch"
    user_conf.mkdir(parents=True)
    (user_conf / "seven.yaml").write_text(
        "name: seven\ntask: digit\nnum_classes: 10\nhead:\n"
        "  _target_: lightning_freeze.models.mlp_head\n  num_classes: 10\n  hidden: 16\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    env = _env(pythonpath=str(target))
    script = [str(target / "bin" / "lightning-freeze-train")]
    where = _ok(
        _app(
            ["--info", "searchpath", "--config-dir", str(tmp_path / "myconf")], work, command=script, env=env
        )
    )
    assert "pkg://lightning_freeze.conf" in where.stdout and str(tmp_path / "myconf") in where.stdout
    args = [
        "--config-dir",
        str(tmp_path / "myconf"),
        "branch=seven",
        "trainer.fast_dev_run=true",
        "quiet=true",
    ]
    result = _ok(_app([*args, "hydra.run.dir=run"], work, command=script, env=env))
    assert "summary (trained branch: seven)" in result.stdout
    assert json.loads((work / "run" / "summary.json").read_text())["trained_branch"] == "seven"
    imported = _ok(
        subprocess.run(
            [sys.executable, "-c", "import lightning_freeze.train as t; print(t.__file__)"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    )
    assert imported.stdout.strip().startswith(str(target))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["experiment=stage2"],
            "Missing mandatory value: init_from (stage=2 starts from the checkpoint",
        ),
        (["experiment=stage2", "init_from=missing.ckpt"], "init_from='missing.ckpt': no such file"),
        (
            ["experiment=stage2", "init_from={s2}", "branch=digit"],
            "branch.name='digit' collides with a branch of init_from=",
        ),
        (
            ["data=image_folder", "branch=folder", "data.root=no/such/folder"],
            "data (lightning_freeze.data.ImageFolderDataModule): data.root='no/such/folder' is not a folder",
        ),
    ],
)
def test_bad_input_is_one_clear_line(
    overrides: list[str], message: str, stages: dict[str, Path], tmp_path: Path
) -> None:
    from _app_stage1 import compose_app

    import lightning_freeze.train as app

    cfg = compose_app([o.format(s2=stages["s2"]) for o in overrides], tmp_path / "run")
    with pytest.raises(app.AppInputError) as info:
        app.train(cfg)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text
    if "collides" in message:
        assert "(its branches: digit, parity)" in text
        # the hint never suggests a taken name
        assert text.endswith(
            "choose a new branch (shipped options not taken: folder, high, mod3) or "
            "rename this one: branch.name=digit_2"
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Hydra refuses the command line: its multi-line message, as one line
        (
            ["foo=1"],
            "Error: Could not override 'foo'; To append to your config use +foo=1; "
            "Key 'foo' is not in struct",
        ),
        (["model=nope"], "Error: In 'train': Could not find 'model/nope'"),
        # a package check that fails inside fit: one line, not a 30-line traceback
        (
            ["callbacks=[default,freeze_backbone]", "callbacks.freeze_backbone.modules=backbon"],
            "Error: ",
        ),
    ],
)
def test_the_command_line_reports_a_config_mistake_in_one_line_and_exit_1(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = run_app(
        [*args, "quiet=true", "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    if "backbon" in " ".join(args):
        assert "'backbon'" in lines[0] and "backbone" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written: no empty output directory left behind


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    env = _env()
    env["HYDRA_FULL_ERROR"] = "1"
    result = _app(["foo=1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env=env)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "Could not override 'foo'" in result.stderr


def test_package_and_lightning_logs_and_the_summary_reach_train_log(stages: dict[str, Path]) -> None:
    log = (stages["root"] / "s2" / "train.log").read_text()
    assert "MultiBranchModule: loaded" in log  # the package
    assert "`Trainer.fit` stopped" in log  # Lightning
    assert "summary (trained branch: parity)" in log and "frozen tensors: checked" in log  # the summary
    # quiet=true keeps the console short, not the log file; and nothing is printed twice
    out = (stages["root"] / "s2_stdout.txt").read_text()
    assert "MultiBranchModule: loaded" not in out and out.count("summary (trained branch: parity)") == 1


def test_help_imports_neither_torch_nor_lightning(tmp_path: Path) -> None:
    # --help composes the configs (Hydra) and needs nothing of the training stack: it answers fast
    probe = (
        "import sys\n"
        "sys.argv = ['lightning-freeze-train', '--help']\n"
        "from lightning_freeze.train import main\n"
        "try:\n    main()\nexcept SystemExit as exit_:\n    assert exit_.code in (0, None), exit_.code\n"
        "print('loaded:', sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))\n"
    )
    result = _ok(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(), capture_output=True,
                                text=True, timeout=120, check=False))  # fmt: skip
    assert "== Config ==" in result.stdout and "hparams_search: optuna" in result.stdout
    assert result.stdout.rstrip().endswith("loaded: []")


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="needs the optuna extra: pip install hydra-optuna-sweeper",
)
def test_hparams_search_optuna_sweeps_on_optimized_metric(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    args.append("hydra.sweeper.sampler.n_startup_trials=2")
    result = run_app_ok([*args, f"hydra.sweep.dir={sweep}", *FAST], tmp_path)
    trials = [json.loads((sweep / job / "summary.json").read_text()) for job in ("0_digit", "1_digit")]
    best = max(t["branches"][0]["val_acc"] for t in trials)  # the objective: digit/val_acc, maximised
    assert f"Best value: {best}" in result.stdout
    assert "best_value: " in (sweep / "optimization_results.yaml").read_text()
