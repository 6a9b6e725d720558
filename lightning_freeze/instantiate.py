"""Instantiate Hydra configs, refusing ``_target_``\\ s outside an allow-list of module prefixes.

A :class:`~lightning_freeze.MultiBranchModule` stores the configs of its parts (backbone,
branches, losses, metrics, optimizer, scheduler) in its hyper-parameters, and
``MultiBranchModule.load_from_checkpoint`` / :func:`lightning_freeze.train.load_model` rebuild
the module from them. A checkpoint is data, but a ``_target_`` in it names code that is called:
``torch.load(weights_only=True)`` accepts a checkpoint whose hyper-parameters say
``{"_target_": "builtins.open", "file": "x", "mode": "w"}``, and instantiating it creates a file.
So every config the package instantiates for a model is checked first: each ``_target_`` (nested
ones too) must name an object *defined* in a module under an allowed prefix, reached without
leaving the allowed packages (``torch.nn.modules.module.os.system`` is refused: ``os`` is not
allowed), with no dunder in its path.

The default allow-list (:data:`DEFAULT_ALLOWED_TARGETS`) covers what builds models, losses,
metrics, optimizers and schedulers, and every target of the shipped configs. It is deliberately
narrower than whole packages: ``torch.save`` writes files and ``torch.hub.load`` runs code from
the internet, so ``torch`` as a whole is not allowed, only ``torch.nn`` and ``torch.optim``.
The allow-list restricts what a checkpoint can call; it is not a sandbox for untrusted code.

Extend it, for your own packages, in any of these ways (prefixes are dotted module paths,
matched on whole components: ``mypkg`` allows ``mypkg.models.Net``, not ``mypkg2``):

* ``with allow_targets("mypkg"): MultiBranchModule.load_from_checkpoint(path)``;
* ``load_model(path, allow_targets=["mypkg"])``;
* the environment variable ``LIGHTNING_FREEZE_ALLOWED_TARGETS="mypkg,otherpkg.models"``;
* in the training app, the config key ``allow_targets=[mypkg]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from lightning_freeze.core.errors import ConfigInstantiationError, TargetNotAllowedError

__all__ = [
    "ALLOWED_TARGETS_ENV",
    "DEFAULT_ALLOWED_TARGETS",
    "ConfigInstantiationError",
    "TargetNotAllowedError",
    "allow_targets",
    "allowed_targets",
    "check_targets",
    "instantiate",
    "is_config",
]

#: module prefixes whose objects a model config may instantiate, without any extension
DEFAULT_ALLOWED_TARGETS: tuple[str, ...] = (
    "torch.nn",
    "torch.optim",
    "torchvision.models",
    "torchvision.ops",
    "timm.create_model",
    "timm.models",
    "timm.layers",
    "torchmetrics",
    "lightning_freeze.models",
    "lightning_freeze.data",
    "lightning_freeze.module",
    "lightning_freeze.MultiBranchModule",
)
#: environment variable with extra allowed prefixes, comma-separated
ALLOWED_TARGETS_ENV = "LIGHTNING_FREEZE_ALLOWED_TARGETS"

_EXTRA: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("lightning_freeze_allow", default=())


def is_config(obj: Any) -> bool:
    """Whether ``obj`` is a Hydra config for an object (a mapping with ``_target_``)."""
    return isinstance(obj, Mapping) and "_target_" in obj


def allowed_targets() -> tuple[str, ...]:
    """The prefixes allowed now: defaults, ``LIGHTNING_FREEZE_ALLOWED_TARGETS``, :func:`allow_targets`."""
    env = tuple(p.strip() for p in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",") if p.strip())
    return DEFAULT_ALLOWED_TARGETS + env + _EXTRA.get()


@contextlib.contextmanager
def allow_targets(*prefixes: str | Iterable[str]) -> Iterator[tuple[str, ...]]:
    """Allow more ``_target_`` module prefixes inside a ``with`` block (this thread/task only).

    Args:
        prefixes: dotted module paths (``"mypkg"``, ``"mypkg.models"``), or iterables of them.

    Returns:
        a context manager yielding the full allow-list in effect inside the block.

    Raises:
        ValueError: a prefix that is not a dotted name.

    Example::

        from lightning_freeze.instantiate import allow_targets

        with allow_targets("mypkg"):
            model = MultiBranchModule.load_from_checkpoint("last.ckpt")
    """
    flat = [p for item in prefixes for p in ([item] if isinstance(item, str) else item)]
    for prefix in flat:
        if not isinstance(prefix, str) or not all(part.isidentifier() for part in prefix.split(".")):
            raise ValueError(
                f"Invalid allowed target prefix {prefix!r}; valid choices: a dotted module path such as "
                "'mypkg' or 'mypkg.models'."
            )
    token = _EXTRA.set(_EXTRA.get() + tuple(flat))
    try:
        yield allowed_targets()
    finally:
        _EXTRA.reset(token)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_ancestor(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is a package on the way to an allowed prefix (``torch`` for ``torch.nn``)."""
    return any(p.startswith(name + ".") for p in prefixes)


def _refuse(target: Any, what: str, reason: str, allowed: tuple[str, ...]) -> TargetNotAllowedError:
    top = str(target).split(".")[0] if isinstance(target, str) and target else "<package>"
    return TargetNotAllowedError(
        f"Refused to instantiate {what} with _target_={target!r}: {reason}. Allowed module prefixes: "
        f"{', '.join(allowed)}. If you trust where this config (e.g. a checkpoint's hyper-parameters) "
        f"comes from, allow its package: `with lightning_freeze.instantiate.allow_targets({top!r}): ...`, "
        f"load_model(path, allow_targets=[{top!r}]), {ALLOWED_TARGETS_ENV}={top}, or allow_targets=[{top}] "
        "in the training app.",
        str(target),
    )


def _check_target(target: Any, what: str, allowed: tuple[str, ...]) -> None:
    """Resolve ``target`` the way Hydra does, without importing or reaching outside ``allowed``."""
    if not isinstance(target, str) or not target:
        raise _refuse(target, what, "a _target_ must be a dotted path string", allowed)
    parts = target.split(".")
    if not all(p.isidentifier() and not p.startswith("__") for p in parts):
        raise _refuse(target, what, "a dotted path of plain names (no dunders) is required", allowed)
    if not _under(target, allowed):
        raise _refuse(target, what, "it is not under an allowed prefix", allowed)
    try:
        obj: Any = importlib.import_module(parts[0])
        for index, part in enumerate(parts[1:], start=1):
            if hasattr(obj, part):
                obj = getattr(obj, part)
            elif inspect.ismodule(obj):
                obj = importlib.import_module(".".join(parts[: index + 1]))
            else:
                raise ImportError(f"{type(obj).__name__} has no attribute {part!r}")
            if inspect.ismodule(obj) and not (
                _under(obj.__name__, allowed) or _is_ancestor(obj.__name__, allowed)
            ):
                raise _refuse(target, what, f"its path goes through module {obj.__name__!r}", allowed)
    except ImportError as err:
        raise ConfigInstantiationError(f"{what}: cannot locate _target_={target!r} ({err})") from err
    if inspect.ismodule(obj):
        raise _refuse(target, what, "it names a module, not a class or function", allowed)
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not _under(module, allowed):
        raise _refuse(target, what, f"the object it names is defined in module {module!r}", allowed)


def check_targets(config: Any, what: str = "config") -> None:
    """Check every ``_target_`` in ``config`` (nested ones included) against :func:`allowed_targets`.

    Args:
        config: a config (mapping, list, ``DictConfig``...) or a plain value.
        what: how error messages name the config (``"backbone"``, ``"branches['a']"``).

    Raises:
        TargetNotAllowedError: a target outside the allow-list, naming it and how to allow it.
        ConfigInstantiationError: a target under an allowed prefix that does not exist.
    """
    allowed = allowed_targets()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            if "_target_" in node:
                _check_target(node["_target_"], path, allowed)
            for key, value in node.items():
                if key != "_target_":
                    walk(value, f"{path}.{key}")
        elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):  # ListConfig too
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(config, what)


def instantiate(config: Any, what: str = "config", *, check: bool = True, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with allowed targets only, and mistakes reported in one line.

    Args:
        config: the config (a mapping or ``DictConfig`` with ``_target_``).
        what: how error messages name the config (the app uses its config key, e.g. ``"model.backbone"``).
        check: check every ``_target_`` with :func:`check_targets` first. Only configs that can never
            come from a checkpoint (the training app's own trainer/callbacks/logger/data nodes) skip it.
        kwargs: passed to ``hydra.utils.instantiate`` (``_partial_=True``, ``_recursive_=False``, overrides).

    Returns:
        the instantiated object.

    Raises:
        TargetNotAllowedError: a ``_target_`` outside the allow-list (nothing was called).
        ConfigInstantiationError: a missing mandatory value, or the target refused its arguments:
            ``"<what> (<target>): <first line of the cause>"``; the original error is the ``__cause__``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate
    from omegaconf.errors import MissingMandatoryValue

    if check:
        check_targets(config, what)
    try:
        return hydra_instantiate(config, **kwargs)
    except MissingMandatoryValue as err:
        raise ConfigInstantiationError(f"Missing mandatory value: {err.full_key or what}") from err
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, MissingMandatoryValue):
            raise ConfigInstantiationError(
                f"Missing mandatory value: {what}.{cause.full_key}".rstrip(".")
            ) from err
        if isinstance(cause, ConfigInstantiationError):
            # a nested config refused by our own instantiate (e.g. a module building its parts)
            if isinstance(cause, TargetNotAllowedError):
                raise TargetNotAllowedError(str(cause), cause.target) from err
            raise ConfigInstantiationError(str(cause)) from err
        target = config.get("_target_") if isinstance(config, Mapping) or hasattr(config, "get") else None
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ConfigInstantiationError(f"{what} ({target}): {message}") from err
