"""What the app prints and writes: debug presets do what their docs say, quiet is quiet, Ctrl-C says
how to resume, no product tips, and the feature cache's off-switch names the real cause."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
from helpers.app import run_app
from helpers.freeze import TinyNet
from test_feature_cache import fit

from lightning_freeze import FeatureCache, FreezeBackbone


class Interrupt(L.Callback):
    """Presses Ctrl-C after the first training batch of the second epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def _no_full_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def test_debug_fdr_writes_no_checkpoint_and_keeps_the_trainer_accelerator(tmp_path: Path) -> None:
    from _app_stage1 import compose_app

    cfg = compose_app(["trainer=gpu", "debug=fdr"])
    assert cfg.trainer.accelerator == "gpu"  # not silently the CPU
    run = tmp_path / "run"
    code, out, err = run_app(["debug=fdr", "quiet=true", f"hydra.run.dir={run}"])
    assert code == 0, err
    # what conf/debug/fdr.yaml and docs/app.md say it writes: train.log, summary.json, .hydra/
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "summary.json", "train.log"]
    assert "checkpoint: -" in out


def test_quiet_prints_the_summary_only_and_no_product_tips(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "quiet=true",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]
    code, out, err = run_app([*args, f"hydra.run.dir={run}"])
    assert code == 0, err
    assert out.startswith("== lightning-freeze-train: stage 1 summary"), out
    assert "[INFO]" not in out + err and "LeafSpec" not in out + err
    log = (run / "train.log").read_text()
    assert "`Trainer.fit` stopped" in log  # the file keeps Lightning's lines
    assert "Tip:" not in log and "litlogger" not in log and "litlogger" not in out + err


def test_ctrl_c_with_quiet_says_it_stopped_and_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "quiet=true",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "+callbacks.interrupt._target_=test_app_console.Interrupt",
        f"hydra.run.dir={run}",
    ]
    code, out, err = run_app(args)
    assert code == 1
    shown = [line for line in (out + err).splitlines() if line.strip()]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert any(
        line.endswith(f"interrupted (Ctrl-C) in epoch 2; resume it: the same command + ckpt_path={last}")
        for line in shown
    ), shown


def test_the_cache_turning_off_at_an_unfreeze_names_the_unfreeze(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        fit([FeatureCache("backbone"), FreezeBackbone("backbone", unfreeze_at_epoch=1)], model=TinyNet())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FeatureCache: backbone")]
    assert len(lines) == 2, lines  # the switch-off, and the statistics at the end of the fit
    assert lines[0].startswith("FeatureCache: backbone is no longer cacheable: ")
    for line in lines:
        assert "norm='train'" not in line and "dropout='train'" not in line
        assert (
            "in train mode (backbone.1, backbone.3, backbone.5): their output changes from call to call "
            "(it was unfrozen)" in line
        )


def test_quiet_is_quiet_under_the_packed_launcher(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from _app_stage1 import shared_stage1

    stage1 = shared_stage1(tmp_path_factory)
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "launcher=packed",
        "experiment=stage2",
        f"init_from={stage1}",
        "model.optimizer.lr=1e-3,1e-2",
        "quiet=true",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        f"hydra.sweep.dir={sweep}",
    ]
    code, out, err = run_app(args)
    assert code == 0, err
    info = [line for line in (out + err).splitlines() if "[INFO]" in line]
    # the launcher's one line on how it runs the sweep, and no other INFO line
    assert info == [info[0]] and info[0].endswith(
        "launcher=packed: training 2 jobs as packed variants in one process"
    )
    assert "LeafSpec" not in out + err
    assert (out + err).count("summary (trained branch: parity)") == 2  # one per job, nothing else
    assert sorted(p.name for p in sweep.iterdir() if p.name[0].isdigit()) == ["0_parity", "1_parity"]


def test_debug_profiler_reports_in_the_log_and_debug_limit_runs_three_short_epochs(tmp_path: Path) -> None:
    # conf/debug/profiler.yaml: "Lightning's simple profiler over one short epoch (report in the log)"
    run = tmp_path / "profiler"
    code, _, err = run_app(
        ["debug=profiler", "quiet=true", "trainer.limit_train_batches=2", f"hydra.run.dir={run}"]
    )
    assert code == 0, err
    assert "Profiler Report" in (run / "train.log").read_text()
    # conf/debug/limit.yaml: "3 epochs of a few batches each (checkpoints and logs are written)"
    run = tmp_path / "limit"
    code, _, err = run_app(
        ["debug=limit", "quiet=true", "trainer.limit_train_batches=2", f"hydra.run.dir={run}"]
    )
    assert code == 0, err
    log = (run / "train.log").read_text()
    assert "epoch 3/3" in log and "epoch 4/" not in log
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("csv/**/metrics.csv"))
