"""A stage's settings: checked, and inherited from the stage it starts from (Hydra/OmegaConf only, no torch).

Stage N+1 starts from what stage N recorded in its checkpoint (:mod:`lightning_freeze.stages`):

* the backbone is always the checkpoint's (its architecture, input channels, ...): it is frozen.
  Selecting another one on the command line (``model=...``, ``model.backbone.*=...``) is an error
  unless it describes the same backbone; pretrained ``weights`` are never loaded again (the
  checkpoint holds the weights);
* every other ``model`` node (optimizer, scheduler, ...) and every ``data`` key that this run leaves
  at its preset's default comes from the previous stage; what this run sets (on the command line,
  or in the experiment config, e.g. ``data.half: B`` in ``experiment=stage2``) wins. Values that are
  interpolations (``data.task: ${branch.task}``) always follow this run's config. Data keys are
  inherited only when both stages use the same data module.
* ``data.channels`` must match the frozen backbone's input channels (one clear error otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_freeze.app import AppInputError

__all__ = [
    "WEIGHT_KEYS",
    "allowed_targets",
    "check_stage",
    "command_line_keys",
    "inherit_previous_stage",
    "to_container",
    "without_weights",
]

log = logging.getLogger(__name__)

#: backbone arguments that load pretrained weights, and their "load nothing" value
WEIGHT_KEYS: dict[str, Any] = {"weights": None, "pretrained": False, "checkpoint_path": ""}
#: backbone arguments that give its input channels
_CHANNEL_KEYS = ("in_channels", "in_chans")
INIT_WEIGHTS = ("raw", "ema")


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
    keys = []
    for key in node:
        if f"{prefix}.{key}" in explicit or any(e.startswith(f"{prefix}.{key}.") for e in explicit):
            continue
        if OmegaConf.is_interpolation(node, key) or key not in baseline:
            continue
        ours = OmegaConf.to_container(node, resolve=False).get(key)
        preset = OmegaConf.to_container(baseline, resolve=False).get(key)
        if ours == preset:
            keys.append(str(key))
    return keys


def inherit_previous_stage(cfg: DictConfig, previous: Any, init_from: str) -> dict[str, Any]:
    """Fill ``cfg.model`` and ``cfg.data`` from the previous stage (see the module docstring).

    Args:
        cfg: this run's config (changed in place).
        previous: the :class:`~lightning_freeze.stages.PreviousStage` of ``init_from``.
        init_from: its path (for messages).

    Returns:
        the backbone config to build (the previous stage's, without pretrained weights).

    Raises:
        AppInputError: the command line selects another backbone, or other input channels, than
            the frozen one.
    """
    explicit = command_line_keys(cfg)
    baseline = _baseline(cfg)
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

    with open_dict(cfg):
        inherited = []
        for key in _unset_keys(
            cfg.model, baseline.model if baseline is not None else None, explicit, "model"
        ):
            if key in previous.model and key != "backbone":
                if OmegaConf.to_container(cfg.model, resolve=False).get(key) != previous.model[key]:
                    inherited.append(f"model.{key}")
                cfg.model[key] = previous.model[key]
        same_data = previous.data.get("_target_") == cfg.data.get("_target_")
        if same_data:
            for key in _unset_keys(
                cfg.data, baseline.data if baseline is not None else None, explicit, "data"
            ):
                if key in previous.data and key != "_target_":
                    if cfg.data[key] != previous.data[key]:
                        inherited.append(f"data.{key}={previous.data[key]!r}")
                    cfg.data[key] = previous.data[key]
    if inherited:
        log.info("from init_from (stage %s): %s", previous.stage or "?", ", ".join(inherited))

    channels = cfg.data.get("channels")
    for key in _CHANNEL_KEYS:
        frozen = backbone.get(key)
        if channels is not None and frozen is not None and channels != frozen:
            raise AppInputError(
                f"data.channels={channels} contradicts the frozen backbone of init_from={init_from!r} "
                f"({key}={frozen}); valid choice: data.channels={frozen}"
            )
    return backbone
