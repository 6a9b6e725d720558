"""Bad input through the real entry point: exactly one ``Error:`` line, exit 1, no output directory.

The table runs ``lightning_freeze.train.main()`` in-process with ``sys.argv`` (as the console script
does); one case runs in a subprocess for the exit status a shell sees. ``HYDRA_FULL_ERROR=1`` still
gives the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.app import run_app

import lightning_freeze.train as app

REPO = Path(app.__file__).resolve().parent.parent
QUICK = ["quiet=true", "trainer.fast_dev_run=true", "logger=none"]

# (id, overrides, the start of the one line); {text}: a text file, {dir}: the case's tmp_path
CASES = [
    ("unknown key", ["foo=1"], "Error: Could not override 'foo'; To append to your config use +foo=1; "
     "Key 'foo' is not in struct"),
    ("unknown option", ["model=nope"], "Error: In 'train': Could not find 'model/nope'"),
    ("max_epochs not a number", ["trainer.max_epochs=abc"],
     "Error: Invalid trainer.max_epochs='abc'; valid choices: an integer, or null"),
    ("limit not a number", ["trainer.limit_train_batches=lots"],
     "Error: Invalid trainer.limit_train_batches='lots'; valid choices: an integer (batches), a float"),
    ("negative learning rate", ["model.optimizer.lr=-1"],
     "Error: model.optimizer (torch.optim.AdamW): Invalid learning rate: -1"),
    ("ckpt_path a text file", ["ckpt_path={text}"], "Error: ckpt_path='{text}': "),
    ("ckpt_path missing", ["ckpt_path={dir}/none.ckpt"],
     "Error: ckpt_path='{dir}/none.ckpt': no such file (the checkpoint of the run to resume)"),
    ("init_from a text file", ["experiment=stage2", "init_from={text}"], "Error: init_from='{text}': "),
    ("stage 2 without init_from", ["experiment=stage2"],
     "Error: Missing mandatory value: init_from (stage=2 starts from the checkpoint"),
    ("stage 0", ["stage=0"], "Error: Invalid stage=0; valid choices: an integer >= 1"),
    ("init_weights", ["init_weights=avg"], "Error: Invalid init_weights='avg'; valid choices: 'raw', 'ema'"),
    ("allow_targets", ["allow_targets=5"], "Error: Invalid allow_targets=5; valid choices: a list of module"),
    ("optimized_metric", ["optimized_metric=digit/nope"],
     "Error: Invalid optimized_metric='digit/nope'; valid choices: digit/val_acc, digit/val_loss"),
    ("image_folder without root", ["experiment=stage1", "data=image_folder", "branch=folder"],
     "Error: Missing mandatory value: data.root"),
    ("image_folder missing root", ["data=image_folder", "branch=folder", "data.root={dir}/no"],
     "Error: data (lightning_freeze.data.ImageFolderDataModule): data.root='{dir}/no' is not a folder"),
    ("freeze pattern typo",
     ["callbacks=[default,freeze_backbone]", "callbacks.freeze_backbone.modules=backbon"], "Error: "),
    ("slurm without the plugin", ["-m", "launcher=submitit_slurm"],
     "Error: Unknown plugin class : 'hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher'; "
     'the plugin is not installed: pip install "lightning-freeze[slurm]"'),
]  # fmt: skip


def _one_error_line(code: int, out: str, err: str, start: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith(start), (lines[0], start)
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture(autouse=True)
def _no_full_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.mark.parametrize(("overrides", "start"), [pytest.param(o, s, id=i) for i, o, s in CASES])
def test_bad_input_is_one_error_line_exit_1_and_no_output_directory(
    overrides: list[str], start: str, tmp_path: Path
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    values = {"text": str(text), "dir": str(tmp_path)}
    args = [o.format(**values) for o in overrides]
    multirun = "-m" in args
    run_dir = tmp_path / "run"
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    result = run_app([*args, *QUICK, where])
    line = _one_error_line(*result, start.format(**values))
    if "backbon" in " ".join(args):  # found during fit: the bad value and the valid choices
        assert "'backbon'" in line and "backbone" in line
    assert not run_dir.exists()
    assert "HYDRA_FULL_ERROR" not in result.environ  # the app's own setting does not outlive the run


def test_trainer_ddp_debug_fdr_needs_a_gpu_and_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: trainer=ddp debug=fdr runs (scripts/gpu_check.sh)")
    run_dir = tmp_path / "run"
    code, out, err = run_app(["trainer=ddp", "debug=fdr", "quiet=true", f"hydra.run.dir={run_dir}"])
    line = _one_error_line(code, out, err, "Error: trainer.accelerator='gpu' but this machine has no GPU")
    assert line.endswith("run on the CPU: trainer=cpu, or trainer=ddp_cpu for DDP")
    assert not run_dir.exists()


def test_hparams_search_optuna_without_the_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the plugins are scanned once per process: the optuna sweeper registered itself
    sweepers = ConfigStore.instance().repo["hydra"]["sweeper"]
    if "optuna.yaml" in sweepers:  # installed here: take it away, as if the extra were not installed
        monkeypatch.delitem(sweepers, "optuna.yaml")
    run_dir = tmp_path / "sweep"
    code, out, err = run_app(["-m", "hparams_search=optuna", *QUICK, f"hydra.sweep.dir={run_dir}"])
    line = _one_error_line(code, out, err, "Error: ")
    assert line == (
        "Error: In 'hydra/config': Could not find 'hydra/sweeper/optuna'; "
        'the plugin is not installed: pip install "lightning-freeze[optuna]"'
    )
    assert not run_dir.exists()


def test_an_output_directory_that_cannot_be_created_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    run_dir = locked / "run"
    try:
        run_dir.mkdir()
    except PermissionError:
        pass
    else:  # root ignores the mode bits: refuse the directory as a read-only file system would
        run_dir.rmdir()
        real_mkdir = Path.mkdir

        def read_only(self: Path, *args: object, **kwargs: object) -> None:
            if self == run_dir or run_dir in self.parents:
                raise PermissionError(13, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    try:
        code, out, err = run_app([*QUICK, f"hydra.run.dir={run_dir}"])
    finally:
        locked.chmod(0o755)
    line = _one_error_line(code, out, err, f"Error: cannot write the output directory '{run_dir}': ")
    assert line.endswith(
        "choose a writable one: hydra.run.dir=DIR (hydra.sweep.dir=DIR with -m) or paths.log_dir=DIR"
    )


def test_hydra_full_error_still_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    for args, error in (
        (["trainer.max_epochs=abc"], app.AppInputError),  # the app's check
        (["foo=1"], ConfigCompositionException),  # Hydra's composition
    ):
        argv = ["lightning-freeze-train", *args, *QUICK, f"hydra.run.dir={tmp_path / 'run'}"]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(error):
            app.main()
        assert os.environ["HYDRA_FULL_ERROR"] == "1"  # the user's setting is left as it was


def test_a_shell_sees_exit_1_and_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_freeze.train", "model.optimizer.lr=-1", *QUICK,
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: model.optimizer (torch.optim.AdamW): Invalid learning rate: -1"
    assert not (tmp_path / "run").exists()
