"""Resume (ckpt_path, SLURM requeue), the test phase, optimized_metric, the checkpoint the summary names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _app_stage1 import compose_app

import lightning_freeze.train as app
from lightning_freeze.app.report import optimized_value
from lightning_freeze.app.runtime import REQUEUE_ENV

# 3 batches per epoch; EMA so that a callback's state must come back too
RUN = ["experiment=stage1", "quiet=true", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]
RUN += ["callbacks=[default,ema]", "callbacks.ema.decay=0.5"]


def _state(path: str | Path) -> dict:
    return torch.load(path, weights_only=True)


def _same_training(a: dict, b: dict) -> bool:
    ema_a = a["callbacks"][next(k for k in a["callbacks"] if "FrozenSafeEMA" in k)]
    ema_b = b["callbacks"][next(k for k in b["callbacks"] if "FrozenSafeEMA" in k)]
    return (
        a["global_step"] == b["global_step"]
        and all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
        and str(ema_a) == str(ema_b)
    )


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-epoch run: what a resumed one must end with, bit for bit."""
    summary = app.train(compose_app([*RUN, "trainer.max_epochs=2"], tmp_path_factory.mktemp("straight")))
    return _state(summary.checkpoint)


def test_ckpt_path_resumes_exactly(two_epochs: dict, tmp_path: Path) -> None:
    first = app.train(compose_app([*RUN, "trainer.max_epochs=1"], tmp_path / "a"))
    assert _state(first.checkpoint)["global_step"] == 3
    resumed = app.train(
        compose_app([*RUN, "trainer.max_epochs=2", f"ckpt_path={first.checkpoint}"], tmp_path / "b")
    )
    assert resumed.resumed_from == first.checkpoint
    assert f"resumed from: {first.checkpoint}" in resumed.format()
    # weights, EMA shadow and step count equal the uninterrupted run's (shuffling included: the app
    # restores the random generators, which Lightning does not)
    assert _same_training(_state(resumed.checkpoint), two_epochs)


def test_a_requeued_slurm_job_resumes_from_its_own_last_checkpoint(
    two_epochs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "job"
    # the job is preempted after its first epoch (its last.ckpt is on disk) ...
    first = app.train(compose_app([*RUN, "trainer.max_epochs=1"], run_dir))
    # ... SLURM requeues it: the same command, output directory and config; SLURM_RESTART_COUNT=1
    monkeypatch.setenv(REQUEUE_ENV, "1")
    again = app.train(compose_app([*RUN, "trainer.max_epochs=2"], run_dir))
    assert again.resumed_from == first.checkpoint == again.checkpoint
    assert _same_training(_state(again.checkpoint), two_epochs)
    # Lightning's own SLURM checkpoint (SIGUSR1 with auto_requeue) is newer: Lightning resumes from it
    from lightning_freeze.app.runtime import requeued_checkpoint

    assert requeued_checkpoint(run_dir, run_dir / "checkpoints") == str(run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert requeued_checkpoint(run_dir, run_dir / "checkpoints") is None
    # not a requeue: a run never resumes by itself
    monkeypatch.setenv(REQUEUE_ENV, "0")
    assert requeued_checkpoint(run_dir, run_dir / "checkpoints") is None


def test_missing_ckpt_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(app.AppInputError, match=r"^ckpt_path='nope.ckpt': no such file"):
        app.train(compose_app([*RUN, "ckpt_path=nope.ckpt"], tmp_path))


def test_monitor_keeps_the_best_and_the_summary_names_last_and_tests_best(tmp_path: Path) -> None:
    overrides = [
        *RUN,
        "trainer.max_epochs=3",
        "callbacks.model_checkpoint.monitor=digit/val_loss",
        "callbacks.model_checkpoint.mode=min",
        "test=true",
    ]
    summary = app.train(compose_app(overrides, tmp_path))
    # the checkpoint the summary names holds the weights its metrics are of: the end of training
    assert Path(summary.checkpoint).name == "last.ckpt" and _state(summary.checkpoint)["epoch"] == 2
    assert summary.tested == "best" and summary.tested_checkpoint != summary.checkpoint
    assert Path(summary.tested_checkpoint).name.startswith("epoch")
    trained = summary.branches[0]
    assert 0.0 <= trained["test_acc"] <= 1.0 and trained["test_loss"] > 0
    assert f"tested: the best checkpoint {summary.tested_checkpoint}" in summary.format()
    assert optimized_value(summary, "digit/test_acc") == trained["test_acc"]
    assert optimized_value(summary, "digit/val_loss") == trained["val_loss"]
    with pytest.raises(
        app.AppInputError, match=r"Invalid optimized_metric='digit/acc'; valid choices: digit/test_acc"
    ):
        optimized_value(summary, "digit/acc")


def test_test_without_a_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    overrides = [
        "experiment=stage1",
        "quiet=true",
        "trainer.fast_dev_run=true",
        "callbacks=none",
        "test=true",
    ]
    cfg = compose_app(overrides, tmp_path)
    with pytest.raises(app.AppInputError, match=r"^test=true needs a checkpoint to test"):
        app.train(cfg)


def test_every_epoch_logs_one_progress_line_naming_stage_and_branch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="lightning_freeze.app.progress")
    app.train(compose_app([*RUN, "trainer.max_epochs=2"], tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_freeze.app.progress"]
    assert [line.split(" train_loss")[0] for line in lines] == [
        "stage 1, branch digit: epoch 1/2",
        "stage 1, branch digit: epoch 2/2",
    ]
    assert all("val_acc" in line for line in lines)
