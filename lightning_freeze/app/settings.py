"""A stage's settings: checked, and inherited from the stage it starts from (Hydra/OmegaConf only, no torch).

Stage N+1 starts from what stage N recorded in its checkpoint (:mod:`lightning_freeze.stages`) and
in the settings file written next to it (:data:`SETTINGS_FILE`, ``stage_settings.yaml``):

* the backbone is always the checkpoint's (its architecture, input channels, ...): it is frozen.
  Selecting another one on the command line (``model=...``, ``model.backbone.*=...``) is an error
  unless it describes the same backbone; pretrained ``weights`` are never loaded again (the
  checkpoint holds the weights);
* the ``model`` and ``data`` settings the previous stage *set* (on its command line, or inherited
  itself from the stage before) are listed in its settings file, with their values: this run takes
  them, except what its own command line sets. Everything else follows this run's config (its
  presets and its experiment, e.g. ``data.half: B`` in ``experiment=stage2``); values that are
  interpolations in this run (``data.task: ${branch.task}``) always follow it. Data settings are
  inherited only when both stages use the same data module. This run's settings file lists its
  command-line settings plus what it inherited, so stage 3 keeps what stage 1 set.
* a checkpoint without a settings file next to it (written by a version before the file existed,
  or merged): every ``model`` node (optimizer, scheduler, ...) and ``data`` key that this run
  leaves at its preset's default, as found by recomposing the presets, comes from the checkpoint's
  record (the app logs that it falls back to this).
* ``data.channels`` must match the frozen backbone's input channels (one clear error otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_freeze.app import AppInputError

__all__ = [
    "SETTINGS_FILE",
    "WEIGHT_KEYS",
    "allowed_targets",
    "check_stage",
    "command_line_keys",
    "inherit_previous_stage",
    "model_settings",
    "read_stage_settings",
    "stage_settings",
    "to_container",
    "without_weights",
    "write_stage_settings",
]

log = logging.getLogger(__name__)

#: backbone arguments that load pretrained weights, and their "load nothing" value
WEIGHT_KEYS: dict[str, Any] = {"weights": None, "pretrained": False, "checkpoint_path": ""}
#: backbone arguments that give its input channels
_CHANNEL_KEYS = ("in_channels", "in_chans")
INIT_WEIGHTS = ("raw", "ema")
#: the file next to a stage's checkpoints that says which settings a later stage inherits
SETTINGS_FILE = "stage_settings.yaml"
SETTINGS_VERSION = 1
#: model keys a later stage never takes from the settings (the backbone is the checkpoint's)
_NOT_SETTINGS = ("backbone", "branches", "active_branch")


def to_container(node: Any) -> Any:
    """``node`` as plain Python containers, interpolations resolved (plain values pass through)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def without_weights(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone config with its pretrained-weights arguments (:data:`WEIGHT_KEYS`) set to load nothing."""
    cfg = dict(backbone)
    for key, nothing in WEIGHT_KEYS.items():
        if cfg.get(key) not in (None, nothing):
            cfg[key] = nothing  # checkpoints hold the weights: a rebuild downloads and reads nothing
    return cfg


def has_weights(backbone: Mapping[str, Any]) -> bool:
    """Whether the backbone config loads pretrained weights."""
    return any(backbone.get(key) not in (None, nothing) for key, nothing in WEIGHT_KEYS.items())


def check_stage(cfg: DictConfig) -> tuple[int, str | None, str]:
    """Check ``stage``, ``init_from`` and ``init_weights``.

    Returns:
        ``(stage, init_from or None, init_weights)``.

    Raises:
        AppInputError: an invalid value, or a stage > 1 without ``init_from``.
    """
    stage = cfg.get("stage", 1)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        raise AppInputError(f"Invalid stage={stage!r}; valid choices: an integer >= 1")
    init_from = None if OmegaConf.is_missing(cfg, "init_from") else cfg.get("init_from")
    if stage > 1 and init_from in (None, ""):
        raise AppInputError(
            f"Missing mandatory value: init_from (stage={stage} starts from the checkpoint of the previous "
            "stage: init_from=outputs/stage1/runs/<time>/checkpoints/last.ckpt)"
        )
    init_weights = cfg.get("init_weights", "raw")
    if init_weights not in INIT_WEIGHTS:
        raise AppInputError(
            f"Invalid init_weights={init_weights!r}; valid choices: {', '.join(map(repr, INIT_WEIGHTS))}"
        )
    return stage, (str(init_from) if init_from not in (None, "") else None), init_weights


def allowed_targets(cfg: DictConfig) -> list[str]:
    """The config key ``allow_targets``: more ``_target_`` prefixes the model's configs may use."""
    value = to_container(cfg.get("allow_targets")) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AppInputError(
            f"Invalid allow_targets={value!r}; valid choices: a list of module prefixes, "
            "e.g. allow_targets=[mypkg]"
        )
    return value


def _hydra_node(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get()
    return cfg.get("hydra") if isinstance(cfg, DictConfig) and "hydra" in cfg else None


def command_line_keys(cfg: DictConfig) -> set[str]:
    """The config keys this run's command-line overrides set (``model``, ``data.channels``, ...)."""
    hydra_cfg = _hydra_node(cfg)
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    return {str(o).split("=", 1)[0].lstrip("~+") for o in overrides}


def _baseline(cfg: DictConfig) -> DictConfig | None:
    """This run's model and data presets as composed alone (no experiment, no overrides)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    hydra_cfg = _hydra_node(cfg)
    choices = dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
    overrides = [f"{group}={choices[group]}" for group in ("data", "model", "branch") if choices.get(group)]
    name = hydra_cfg.job.config_name if hydra_cfg is not None and hydra_cfg.job.config_name else "train"
    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=name, overrides=overrides)
        with initialize_config_module("lightning_freeze.conf", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    except Exception as err:  # a user config tree we cannot recompose: inherit nothing
        log.warning("cannot recompose the presets to find what this run sets (%s); inheriting nothing", err)
        return None


def _unset_keys(node: DictConfig, baseline: DictConfig | None, explicit: set[str], prefix: str) -> list[str]:
    """Keys of ``node`` that this run leaves at the preset's default (and are not interpolations)."""
    if baseline is None or prefix in explicit:
        return []
    ours = OmegaConf.to_container(node, resolve=False)
    preset = OmegaConf.to_container(baseline, resolve=False)
    assert isinstance(ours, dict) and isinstance(preset, dict)
    return [
        str(key)
        for key in node
        if not any(e == f"{prefix}.{key}" or e.startswith(f"{prefix}.{key}.") for e in explicit)
        and not OmegaConf.is_interpolation(node, key)
        and key in baseline
        and ours.get(key) == preset.get(key)
    ]


def _is_setting(key: str) -> bool:
    """A ``model``/``data`` key a later stage may inherit (not the backbone, not the data module)."""
    parts = key.split(".")
    if parts[0] == "model":
        return len(parts) == 1 or parts[1] not in _NOT_SETTINGS
    return parts[0] == "data" and parts[1:2] != ["_target_"]


def _inheritable(key: str, explicit: set[str]) -> bool:
    """A setting (:func:`_is_setting`) that this run's command line sets neither itself nor above."""
    return _is_setting(key) and key not in explicit and not any(key.startswith(f"{e}.") for e in explicit)


def model_settings(cfg: DictConfig, *, resolve: bool) -> dict[str, Any]:
    """``cfg.model`` as plain containers, without the keys a stage never inherits (the backbone's)."""
    model = OmegaConf.to_container(cfg.model, resolve=resolve)
    assert isinstance(model, dict)
    return {k: v for k, v in model.items() if k not in _NOT_SETTINGS}


def stage_settings(cfg: DictConfig, stage: int, inherited: Iterable[str] = ()) -> dict[str, Any]:
    """What :data:`SETTINGS_FILE` holds for this stage: the settings a later stage starts from.

    Args:
        cfg: this stage's config (after :func:`inherit_previous_stage`).
        stage: its number.
        inherited: the keys it took from the stage before (:func:`inherit_previous_stage`).

    Returns:
        ``{"version", "stage", "set", "model", "data"}``: ``set`` lists the ``model``/``data`` keys
        this stage set on its command line or inherited (``"data"``, ``"model"`` for a preset
        chosen on the command line, ``"data.channels"``, ``"model.optimizer.lr"``, ...); ``model``
        (without backbone and branches, interpolations kept: ``${trainer.max_epochs}`` follows the
        later stage's trainer) and ``data`` (resolved) hold their values.
    """
    keys = {k for k in command_line_keys(cfg) if k.split(".")[0] in ("model", "data")} | set(inherited)
    return {
        "version": SETTINGS_VERSION,
        "stage": stage,
        "set": sorted(k for k in keys if _is_setting(k)),
        "model": model_settings(cfg, resolve=False),
        "data": to_container(cfg.data),
    }


def write_stage_settings(directory: str | Path, settings: Mapping[str, Any]) -> Path:
    """Write :data:`SETTINGS_FILE` into ``directory`` (created if missing), atomically.

    Returns:
        the file's path.
    """
    from lightning_freeze.core.files import write_atomic

    path = Path(directory) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# Written by lightning-freeze-train for stage {settings['stage']}: a later stage started from a\n"
        "# checkpoint of this folder (init_from=...) takes the settings listed under `set` from here;\n"
        "# what its own command line sets wins. Edit `set` (and the values) to change what it inherits.\n"
        + OmegaConf.to_yaml(OmegaConf.create(dict(settings)))
    )
    write_atomic(path, lambda handle: handle.write(text.encode()))
    return path


def read_stage_settings(init_from: str | Path) -> dict[str, Any] | None:
    """:data:`SETTINGS_FILE` next to the checkpoint ``init_from``, or ``None`` when there is none.

    Raises:
        AppInputError: the file is not a settings file of a known version (the message names the
            file and what is wrong).
    """
    path = Path(init_from).expanduser().parent / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:
        raise AppInputError(f"{str(path)!r} is not readable YAML ({type(err).__name__}: {err})") from None
    ok = (
        isinstance(loaded, dict)
        and loaded.get("version") == SETTINGS_VERSION
        and isinstance(loaded.get("set"), list)
        and all(isinstance(k, str) for k in loaded["set"])
        and isinstance(loaded.get("model"), dict)
        and isinstance(loaded.get("data"), dict)
    )
    if not ok:
        raise AppInputError(
            f"{str(path)!r} is not a stage settings file of version {SETTINGS_VERSION} (expected the keys "
            "version, stage, set (a list of keys), model and data, as lightning-freeze-train writes them); "
            f"fix it or delete it to inherit the settings recorded in {Path(init_from).name}"
        )
    assert isinstance(loaded, dict)
    return {str(k): v for k, v in loaded.items()}


def _take_setting(
    cfg: DictConfig, saved: Mapping[str, Any], key: str, explicit: set[str], taken: list[str]
) -> None:
    """Set ``key`` of ``cfg`` to its value in ``saved``, except where this run sets it (recursively)."""
    parts = key.split(".")
    if not _inheritable(key, explicit):
        return  # the backbone, the data module, or set by this run (the key or a node above it)
    value: Any = saved
    for part in parts:
        if not isinstance(value, Mapping) or part not in value:
            return  # not in the saved settings
        value = value[part]
    if len(parts) == 1 or any(e.startswith(f"{key}.") for e in explicit):
        # a whole group, or a node this run sets part of: take its entries one by one
        if isinstance(value, Mapping):
            for child in value:
                _take_setting(cfg, saved, f"{key}.{child}", explicit, taken)
        return
    parent = OmegaConf.select(cfg, ".".join(parts[:-1]), throw_on_resolution_failure=False)
    if not isinstance(parent, DictConfig) or parts[-1] not in parent:
        return  # this run's config has no such setting
    if OmegaConf.is_interpolation(parent, parts[-1]):
        return  # follows this run's config
    if OmegaConf.to_container(parent, resolve=False).get(parts[-1]) != value:
        taken.append(key if isinstance(value, Mapping) else f"{key}={value!r}")
    parent[parts[-1]] = value


def _inherit_from_file(
    cfg: DictConfig, saved: Mapping[str, Any], explicit: set[str]
) -> tuple[list[str], list[str]]:
    """Take the settings ``saved`` lists; ``(keys inherited, "key=value" of those that changed)``."""
    keys, changed = [], []
    same_data = saved["data"].get("_target_") == cfg.data.get("_target_")
    with open_dict(cfg):
        for key in saved["set"]:
            if key.split(".")[0] == "data" and not same_data:
                continue
            _take_setting(cfg, saved, key, explicit, changed)
            if _inheritable(key, explicit):
                keys.append(key)
    return keys, changed


def _inherit_guessed(cfg: DictConfig, previous: Any, explicit: set[str]) -> tuple[list[str], list[str]]:
    """Without a settings file: the keys this run leaves at its presets' defaults, from the record."""
    baseline = _baseline(cfg)
    keys, changed = [], []
    same_data = previous.data.get("_target_") == cfg.data.get("_target_")
    groups = (("model", previous.model, "backbone"), ("data", previous.data if same_data else {}, "_target_"))
    with open_dict(cfg):
        for group, recorded, never in groups:
            node = cfg[group]
            ours = OmegaConf.to_container(node, resolve=group == "data")  # as the record holds them
            for key in _unset_keys(node, baseline[group] if baseline is not None else None, explicit, group):
                if key in recorded and key != never:
                    if ours.get(key) != recorded[key]:  # a data value is shown, a model node is not
                        changed.append(f"{group}.{key}" + ("" if group == "model" else f"={recorded[key]!r}"))
                    node[key] = recorded[key]
                    keys.append(f"{group}.{key}")
    return keys, changed


def inherit_previous_stage(
    cfg: DictConfig, previous: Any, init_from: str
) -> tuple[dict[str, Any], list[str]]:
    """Fill ``cfg.model`` and ``cfg.data`` from the previous stage (see the module docstring).

    Args:
        cfg: this run's config (changed in place).
        previous: the :class:`~lightning_freeze.stages.PreviousStage` of ``init_from``.
        init_from: its path (for messages; the settings file is read next to it).

    Returns:
        ``(backbone, inherited)``: the backbone config to build (the previous stage's, without
        pretrained weights) and the ``model``/``data`` keys taken from the previous stage (for this
        stage's :func:`stage_settings`).

    Raises:
        AppInputError: the command line selects another backbone, or other input channels, than
            the frozen one; an unreadable settings file.
    """
    explicit = command_line_keys(cfg)
    backbone = without_weights(previous.backbone)

    if "model" in explicit or any(k.startswith("model.backbone") for k in explicit):
        asked = without_weights(to_container(cfg.model.backbone) or {})
        keys = sorted(set(asked) | set(backbone))
        different = [k for k in keys if asked.get(k) != backbone.get(k) and k not in WEIGHT_KEYS]
        if different:
            shown = ", ".join(f"{k}={asked.get(k)!r} (frozen: {backbone.get(k)!r})" for k in different)
            raise AppInputError(
                f"model.backbone contradicts the frozen backbone of init_from={init_from!r}: {shown}; "
                "a later stage keeps the backbone of the stage it starts from: drop the model override"
            )

    saved = read_stage_settings(init_from)
    if saved is not None and previous.stage is not None and saved.get("stage") != previous.stage:
        log.warning(
            "%s next to init_from is of stage %s, the checkpoint of stage %s: not used",
            SETTINGS_FILE,
            saved.get("stage"),
            previous.stage,
        )
        saved = None
    if saved is not None:
        inherited, changed = _inherit_from_file(cfg, saved, explicit)
    else:
        log.info(
            "no %s next to init_from (a checkpoint of an earlier version, or merged): inheriting the "
            "settings this run leaves at its presets' defaults from the checkpoint's record",
            SETTINGS_FILE,
        )
        inherited, changed = _inherit_guessed(cfg, previous, explicit)
    if changed:
        log.info("from init_from (stage %s): %s", previous.stage or "?", ", ".join(changed))

    channels = cfg.data.get("channels")
    for key in _CHANNEL_KEYS:
        frozen = backbone.get(key)
        if channels is not None and frozen is not None and channels != frozen:
            raise AppInputError(
                f"data.channels={channels} contradicts the frozen backbone of init_from={init_from!r} "
                f"({key}={frozen}); valid choice: data.channels={frozen}"
            )
    return backbone, inherited
