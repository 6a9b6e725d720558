"""Every shipped config composes, every option of every group runs (fast_dev_run, in-process), and every
``_target_`` node's keys are arguments of its target."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from _app_stage1 import CONF, compose_app, options, shared_stage1
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import lightning_freeze.train as app

EXPERIMENTS = options("experiment")
_compose = compose_app
_options = options


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_stage1(tmp_path_factory)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder tree: 2 classes of 6 RGB images, 8x8 pixels."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir()
        for i in range(6):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_repository_conf_is_the_packaged_conf() -> None:
    top = Path(app.__file__).parent.parent / "conf"
    if top.exists():  # a checkout (not an installed wheel)
        assert top.resolve() == CONF.resolve()
    assert {"stage1", "stage2", "stage3"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}", "init_from=prev.ckpt"])
    assert cfg.stage >= 1 and cfg.task_name == experiment
    callbacks = {node._target_ for node in cfg.callbacks.values()}
    if cfg.stage == 1:
        assert cfg.branch.name == "digit" and cfg.data.half == "A"
        assert "lightning_freeze.FreezeBackbone" not in callbacks
    else:
        assert cfg.data.half == "B" and cfg.branch.name != "digit"
        assert "lightning_freeze.FreezeBackbone" in callbacks
        assert cfg.callbacks.freeze_backbone.freeze_inactive_branches is True
    assert cfg.data.task == cfg.branch.task  # the data follows the branch


def test_later_stages_show_init_from_as_required() -> None:
    for experiment in ("stage2", "stage3"):
        cfg = _compose([f"experiment={experiment}"])
        assert OmegaConf.is_missing(cfg, "init_from")  # `--cfg job` prints `init_from: ???`
        assert "init_from: ???" in OmegaConf.to_yaml(cfg)
    assert _compose(["experiment=stage1"]).init_from is None


@pytest.mark.parametrize(
    ("group", "key"),
    [
        ("model", "model"),
        ("branch", "branch"),
        ("data", "data"),
        ("trainer", "trainer"),
        ("logger", "logger"),
        ("callbacks", "callbacks"),
        ("debug", "trainer"),
    ],
)
def test_every_group_option_composes(group: str, key: str) -> None:
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        node = cfg.get(key)
        if option not in ("none",):
            assert node, (group, option)


def test_model_backbones_instantiate_with_their_feature_size() -> None:
    expected = {"tiny_cnn": 64, "resnet18": 512, "mobilenet_v3_small": 576, "timm": 512}
    assert set(_options("model")) == set(expected)
    for option, features in expected.items():
        cfg = _compose([f"model={option}"])
        assert cfg.model._target_ == "lightning_freeze.MultiBranchModule"
        assert cfg.model.optimizer._partial_ is True
        backbone = instantiate(cfg.model.backbone).eval()
        # torchvision/ours: out_features; timm: num_features (the app reads either)
        assert getattr(backbone, "out_features", None) or backbone.num_features == features
        assert backbone(torch.randn(2, 1, 8, 8)).shape == (2, features)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer=cpu"], {"accelerator": "cpu", "devices": 1, "precision": "32-true"}),
        (["trainer=gpu", "trainer/precision=bf16_mixed"], {"accelerator": "gpu", "precision": "bf16-mixed"}),
        (["trainer=ddp"], {"accelerator": "gpu", "strategy": "ddp", "sync_batchnorm": True}),
        (
            ["trainer=ddp_cpu", "trainer/precision=64_true"],
            {"accelerator": "cpu", "strategy": "ddp", "devices": 2},
        ),
    ],
)
def test_trainer_presets(overrides: list[str], expected: dict) -> None:
    trainer = _compose(overrides).trainer
    assert trainer._target_ == "lightning.pytorch.Trainer"
    for key, value in expected.items():
        assert trainer[key] == value, key


def test_callback_lists_and_rich_replaces_tqdm() -> None:
    cfg = _compose(["experiment=stage2", "callbacks=[default,freeze_backbone,ema,rich_progress_bar]"])
    assert set(cfg.callbacks) == {"model_checkpoint", "progress_bar", "lr_monitor", "freeze_backbone", "ema"}
    assert cfg.callbacks.progress_bar._target_.endswith("RichProgressBar")
    assert cfg.callbacks.ema._target_ == "lightning_freeze.FrozenSafeEMA"


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("packed", "hydra_plugins.lightning_freeze_packed_launcher.packed_launcher.PackedLauncher"),
    ],
)
def test_launcher_presets_compose_even_without_the_plugin(launcher: str, target: str) -> None:
    extra = ["hydra.launcher.timeout_min=30"] if launcher == "submitit_slurm" else []
    cfg = _compose([f"launcher={launcher}", *extra])
    assert cfg.hydra.launcher._target_ == target
    if launcher == "packed":  # shipped with the package: the target always imports
        assert cfg.hydra.launcher.pack is True
        assert _locate(target).__name__ == "PackedLauncher"
    if launcher == "joblib":
        assert cfg.hydra.launcher.n_jobs == 2
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.timeout_min == 30 and "partition" in cfg.hydra.launcher
        # preemption: SLURM signals USR2 120 s before the end, submitit requeues the same job
        assert cfg.hydra.launcher.signal_delay_s == 120 and cfg.hydra.launcher.max_num_timeout >= 1


# ------------------------------------------------------------------------------------------------
# every _target_ node's keys are arguments of its target
# ------------------------------------------------------------------------------------------------
def _target_nodes(node: Any, where: str) -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((where, node))
        for key, value in node.items():
            found.extend(_target_nodes(value, f"{where}.{key}"))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_target_nodes(value, f"{where}[{index}]"))
    return found


def _locate(target: str) -> Any:
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(target)


def _keys(node: dict) -> list[str]:
    """The arguments a node passes (not Hydra's ``_target_``/``_partial_``, nor a defaults list)."""
    return [k for k in node if not k.startswith("_") and k != "defaults"]


def test_every_target_node_matches_its_signature() -> None:
    checked, missing_plugins, problems = 0, set(), []
    for path in sorted(CONF.rglob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        for where, node in _target_nodes(raw, path.relative_to(CONF).as_posix()):
            try:
                target = _locate(node["_target_"])
            except (ImportError, AttributeError):
                assert node["_target_"].startswith("hydra_plugins."), (where, node["_target_"])
                missing_plugins.add(node["_target_"])  # an optional plugin that is not installed here
                continue
            parameters = inspect.signature(target).parameters
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                named = set(parameters)  # e.g. timm.create_model(model_name, pretrained, **kwargs)
                unknown = [k for k in _keys(node) if k not in named and k not in ("num_classes", "in_chans")]
            else:
                unknown = [k for k in _keys(node) if k not in parameters]
            if unknown:
                problems.append(f"{where} ({node['_target_']}): {unknown}")
            checked += 1
    assert problems == []
    assert checked >= 30
    assert missing_plugins <= {"hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}


# ------------------------------------------------------------------------------------------------
# every option of every group runs
# ------------------------------------------------------------------------------------------------
def _cases() -> list[Any]:
    cases = []
    groups = ("model", "branch", "data", "callbacks", "logger", "trainer", "trainer/precision", "launcher")
    for group in groups:
        cases += [pytest.param(group, option, id=f"{group}={option}") for option in options(group)]
    cases += [pytest.param("experiment", option, id=f"experiment={option}") for option in EXPERIMENTS]
    cases += [pytest.param("debug", option, id=f"debug={option}") for option in options("debug")]
    cases += [pytest.param("hparams_search", o, id=f"hparams_search={o}") for o in options("hparams_search")]
    return cases


def _skip_reason(group: str, option: str) -> str | None:
    gpu = torch.cuda.is_available()
    needs_gpu = {("trainer", "gpu"), ("trainer", "ddp"), ("trainer/precision", "16_mixed")}
    if (group, option) in needs_gpu and not gpu:
        return "needs a GPU (composition is tested above)"
    if (group, option) == ("trainer", "ddp_cpu"):
        return (
            "DDP relaunches the command line: test_train_app.py::test_ddp_cpu_from_the_command_line runs it"
        )
    if (group, option) == ("logger", "tensorboard"):
        for module in ("tensorboard", "tensorboardX"):
            if importlib.util.find_spec(module) is not None:
                return None
        return "needs `pip install tensorboard`"
    if group == "hparams_search" and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        return "needs `pip install hydra-optuna-sweeper` (the optuna extra)"
    return None


@pytest.mark.parametrize(("group", "option"), _cases())
def test_every_option_of_every_group_runs(
    group: str, option: str, stage1_checkpoint: Path, image_root: Path, tmp_path: Path
) -> None:
    reason = _skip_reason(group, option)
    if reason:
        pytest.skip(reason)
    overrides = [f"{group}={option}", "quiet=true"]
    if group == "debug":
        overrides += ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
        if option == "overfit":
            overrides.append("trainer.overfit_batches=1")
    else:
        overrides.append("trainer.fast_dev_run=true")
    if (group, option) in {("data", "image_folder"), ("branch", "folder")}:
        overrides += ["data=image_folder", "branch=folder", f"data.root={image_root}", "data.num_workers=0"]
    stage2 = group == "experiment" and option != "stage1"
    if (group, option) == ("callbacks", "feature_cache"):  # a stage-2 preset: it caches a frozen backbone
        overrides[0] = "callbacks=[default,freeze_backbone,feature_cache]"
        overrides += ["experiment=stage2", f"callbacks.feature_cache.directory={tmp_path / 'cache'}"]
        stage2 = True
    if stage2:
        overrides.append(f"init_from={stage1_checkpoint}")
    cfg = _compose(overrides, tmp_path)
    if group == "hparams_search":
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.hydra.sweeper.direction == "maximize"
        assert cfg.optimized_metric == f"{cfg.branch.name}/val_acc"
    summary = app.train(cfg)
    rows = {row["name"]: row for row in summary.branches}
    trained = rows[cfg.branch.name]
    assert trained["status"] == "trained"
    assert 0.0 <= trained["val_acc"] <= 1.0  # validation ran on the trained branch's data
    assert (tmp_path / "summary.json").is_file()
    if (group, option) == ("callbacks", "feature_cache"):  # the summary reports the cache
        assert summary.feature_cache is not None and summary.feature_cache["misses"] > 0
        assert "feature cache: " in summary.format() and "in the disk store" in summary.format()
    else:
        assert summary.feature_cache is None and "feature cache" not in summary.format()
    if stage2:
        assert list(rows) == ["digit", cfg.branch.name] and rows["digit"]["status"] == "frozen"
        assert summary.frozen_changed == 0 and summary.frozen_check.endswith(": 0 changed")


# ------------------------------------------------------------------------------------------------
# the summary and the allow-list
# ------------------------------------------------------------------------------------------------
def test_summary_tells_a_branch_changed_when_unfreeze_at_epoch_unfroze_the_backbone(
    stage1_checkpoint: Path, tmp_path: Path
) -> None:
    overrides = [
        "experiment=stage2",
        f"init_from={stage1_checkpoint}",
        "callbacks.freeze_backbone.unfreeze_at_epoch=1",
        "quiet=true",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    ]
    summary = app.train(_compose(overrides, tmp_path))
    before = torch.load(stage1_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(summary.checkpoint, weights_only=True)["state_dict"]
    backbone = [k for k in before if k.startswith("backbone.")]
    digit = [k for k in before if k.startswith("branches.digit.")]
    # the facts: the digit head is untouched, but the backbone it reads trained from epoch 1 on
    assert all(torch.equal(before[k], after[k]) for k in digit)
    assert any(not torch.equal(before[k], after[k]) for k in backbone)
    rows = {row["name"]: row for row in summary.branches}
    assert (rows["digit"]["status"], rows["digit"]["note"]) == ("changed", "backbone unfrozen at epoch 1")
    assert summary.backbone == "unfrozen at epoch 1"
    # what stayed frozen (the digit head) was still checked
    assert summary.frozen_check == f"checked {len(digit)} frozen tensors: 0 changed"
    text = summary.format()
    assert "digit" in text and "changed" in text and "(backbone unfrozen at epoch 1)" in text
    assert "backbone: unfrozen at epoch 1" in text


def test_init_from_checkpoint_cannot_instantiate_arbitrary_targets(
    stage1_checkpoint: Path, tmp_path: Path
) -> None:
    created = tmp_path / "created_by_the_checkpoint.txt"
    ckpt = torch.load(stage1_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["backbone"] = {"_target_": "builtins.open", "file": str(created), "mode": "w"}
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    cfg = _compose(["experiment=stage2", f"init_from={evil}", "quiet=true"], tmp_path / "run")
    with pytest.raises(
        app.AppInputError, match=r"Refused to instantiate model.backbone with _target_='builtins.open'"
    ):
        app.train(cfg)
    assert not created.exists()


def test_branch_names_that_are_nn_module_attributes_are_refused_before_anything_runs(tmp_path: Path) -> None:
    cfg = _compose(["branch.name=training", "quiet=true"], tmp_path)
    with pytest.raises(app.AppInputError) as info:
        app.train(cfg)
    assert str(info.value).startswith(
        "branch.name: Invalid branch name 'training' (it is an attribute of nn.Module/nn.ModuleDict); "
        "valid choices: a non-empty string without '.' or '/'"
    )


def test_the_summary_never_says_no_freezebackbone_when_one_ran() -> None:
    from lightning_freeze.stages import StageSummary

    def line(**kwargs: Any) -> str:
        text = StageSummary(stage=2, trained_branch="b", **kwargs).format()
        return next(row for row in text.splitlines() if row.startswith("frozen tensors: "))

    # ddp_spawn without a checkpoint: the callback ran in the workers, nothing came back
    assert line(frozen_check_by="not in this process") == (
        "frozen tensors: not checked in this process (FreezeBackbone ran in the worker processes; keep "
        "the model_checkpoint callback so that the main process can check what it froze)"
    )
    assert line(frozen_check_by="verify off") == "frozen tensors: not checked (FreezeBackbone(verify='off'))"
    assert line() == "frozen tensors: not checked (no FreezeBackbone callback)"
