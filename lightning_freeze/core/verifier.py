"""Prove that frozen modules stay bitwise identical: fingerprints, output probes, cross-rank checks.

:class:`FrozenVerifier` is the verification of :class:`~lightning_freeze.FreezeBackbone` without
Lightning: a plain training loop uses it the same way. It keeps

* a **reference fingerprint** of every frozen tensor (parameters and buffers, by ``state_dict``
  key), taken by :meth:`FrozenVerifier.record` (on a sharded ``DTensor``: this rank's shard);
* an **output probe** per frozen module (:class:`~lightning_freeze.core.probe.OutputProbe`): the
  module's output on the first samples of its first input after :meth:`FrozenVerifier.capture`,
  recorded by :meth:`FrozenVerifier.record_probes`, so that a change of *function* (a replaced
  ``forward``, a layer left in train mode) is caught even when no tensor changed;

and :meth:`FrozenVerifier.check` compares all of it with the model now, and in a
``torch.distributed`` job every rank's frozen tensors with every other rank's
(:func:`~lightning_freeze.core.distributed.compare_across_ranks`). A change raises
:class:`~lightning_freeze.core.errors.FrozenStateError` naming every changed tensor by its full
``state_dict`` key and every module whose probe output changed (or warns, ``verify="warn"``).

:meth:`FrozenVerifier.state_dict` / :meth:`FrozenVerifier.load_state_dict` carry the reference and
the probes through a checkpoint, so a resumed run is checked against the first run's start.

Example (a plain PyTorch loop)::

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> _ = net[0].requires_grad_(False)
    >>> verifier = FrozenVerifier()
    >>> verifier.record(net, ["0.weight", "0.bias"])
    >>> verifier.capture(net, ["0"])
    >>> opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    >>> for _ in range(3):
    ...     loss = net(torch.randn(8, 3)).square().mean()
    ...     loss.backward()
    ...     opt.step()
    ...     opt.zero_grad()
    ...     _ = verifier.record_probes(net)
    >>> verifier.check(net).summary()
    'checked 2 frozen tensors: 0 changed'
    >>> list(verifier.probes)
    ['0']
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from lightning_freeze.core.distributed import (
    compare_across_ranks,
    describe_rank_mismatch,
    gather_changed,
    local_shards,
)
from lightning_freeze.core.errors import FrozenStateError
from lightning_freeze.core.fingerprint import (
    FingerprintDiff,
    TensorFingerprint,
    diff_fingerprints,
    fingerprint,
    fingerprints_from_plain,
)
from lightning_freeze.core.freeze import NormMode, likely_cause
from lightning_freeze.core.probe import OutputProbe, ProbeMismatch, capture_probe_input, function_token
from lightning_freeze.core.purity import impure_layers, inherited_guard_rule
from lightning_freeze.core.validation import check_choice, choices_of

__all__ = ["PROBE_MODES", "VERIFY_MODES", "FrozenVerifier", "ProbeMode", "VerifyMode"]

VerifyMode = Literal["raise", "warn", "off"]
VERIFY_MODES: tuple[str, ...] = choices_of(VerifyMode)
ProbeMode = Literal["always", "if_changed"]
PROBE_MODES: tuple[str, ...] = choices_of(ProbeMode)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class FrozenVerifier:
    """Verify that frozen tensors and modules stay as they were (pure PyTorch, no Lightning).

    Args:
        verify: ``"raise"`` (default): :meth:`check` raises
            :class:`~lightning_freeze.core.errors.FrozenStateError` on any change; ``"warn"``: it
            passes the same message to ``warn`` instead; ``"off"``: nothing is recorded or checked
            (:meth:`check` returns ``None``).
        owner: the name the messages start with (``"FreezeBackbone"`` for the callback).
        since: when the reference was taken, as the messages say it (``"fit start"`` for the
            callback).
        warn: called with the message when ``verify="warn"`` (default: :func:`warnings.warn`).

    Attributes:
        reference: ``{state_dict key: TensorFingerprint}`` of the frozen tensors (``None`` before
            :meth:`record` or :meth:`load_state_dict`).
        probes: ``{module name: OutputProbe}`` recorded by :meth:`record_probes`.
        last_check: the :class:`~lightning_freeze.core.fingerprint.FingerprintDiff` of the latest
            :meth:`check` (``None`` before one).
        last_probe_check: the probe mismatches of the latest check (empty: all reproduced).
        probes_skipped: modules whose probe the latest check skipped (``probe="if_changed"``).
        last_rank_check: ``{rank: [keys]}`` of the ranks that differed at the latest check.

    Raises:
        InvalidArgumentError: an unknown ``verify`` (the message lists the choices).
    """

    def __init__(
        self,
        verify: VerifyMode = "raise",
        *,
        owner: str = "FrozenVerifier",
        since: str = "the reference was recorded",
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.verify: VerifyMode = check_choice("verify", verify, VERIFY_MODES)  # type: ignore[assignment]
        self.owner, self.since = owner, since
        self.warn = _warn if warn is None else warn
        self.reference: dict[str, TensorFingerprint] | None = None
        self.probes: dict[str, OutputProbe] = {}
        self.last_check: FingerprintDiff | None = None
        self.last_probe_check: list[ProbeMismatch] = []
        self.probes_skipped: list[str] = []
        self.last_rank_check: dict[int, list[str]] = {}
        self._tokens: dict[str, tuple[Any, ...]] = {}  # function_token when a probe last passed
        self._captures: dict[str, tuple[Any, dict[str, Any]]] = {}  # pending probe-input captures

    @property
    def enabled(self) -> bool:
        """``False`` with ``verify="off"``."""
        return self.verify != "off"

    @property
    def capturing(self) -> bool:
        """Whether a probe input is still awaited (:meth:`record_probes` has something to do)."""
        return bool(self._captures)

    def reset(self) -> None:
        """Forget the reference, the probes and the latest results; remove pending capture hooks."""
        self.stop_capture()
        self.reference, self.probes, self.last_check = None, {}, None
        self.last_probe_check, self.probes_skipped, self.last_rank_check = [], [], {}
        self._tokens = {}

    def record(self, model: nn.Module, keys: Iterable[str]) -> None:
        """Fingerprint the tensors ``keys`` of ``model`` now: the reference later checks compare with.

        A sharded tensor (FSDP2 ``DTensor``) is fingerprinted as this rank's shard: each rank checks
        its own shards. Does nothing with ``verify="off"``.

        Raises:
            KeyError: a key that is not in ``model.state_dict()``.
        """
        if self.enabled:
            self.reference = fingerprint(local_shards(model.state_dict(keep_vars=True))[0], keys)

    def capture(self, model: nn.Module, names: Iterable[str]) -> None:
        """Await the next input of each submodule ``names`` (that has no probe yet) as its probe input.

        A one-shot forward pre-hook keeps the first samples of the input
        (:func:`~lightning_freeze.core.probe.capture_probe_input`); :meth:`record_probes` then runs
        the module on them and keeps the output. Does nothing with ``verify="off"``.
        """
        if not self.enabled:
            return
        for name in names:
            if name not in self.probes and name not in self._captures:
                store: dict[str, Any] = {}
                handle = capture_probe_input(model.get_submodule(name), store)
                self._captures[name] = (handle, store)

    def record_probes(self, model: nn.Module) -> list[str]:
        """Record the probe of every module whose input was captured since :meth:`capture`.

        Call it after the step that ran the modules (the probe is one more forward on two samples,
        under :func:`~lightning_freeze.core.probe.run_module`: no gradient, no random number, no
        buffer change).

        Returns:
            the names of the modules whose probe was recorded now.
        """
        done = [n for n, (_, store) in self._captures.items() if "args" in store]
        for name in done:
            _, store = self._captures.pop(name)
            module = model.get_submodule(name)
            try:
                self.probes[name] = OutputProbe.record(module, store["args"], store["kwargs"])
            except Exception:  # an input with a first dimension that is not the batch: keep it whole
                self.probes[name] = OutputProbe.record(module, store["full_args"], store["full_kwargs"])
            self._tokens[name] = function_token(module)
        return done

    def stop_capture(self) -> None:
        """Remove every pending capture hook (the model is left without any hook of this verifier)."""
        for handle, _ in self._captures.values():
            handle.remove()
        self._captures = {}

    def release(self, names: Iterable[str], keep: Collection[str] = ()) -> None:
        """Stop verifying the modules ``names`` (they were unfrozen): their tensors and probes.

        Args:
            names: dotted module names; every reference key under them is dropped.
            keep: keys under ``names`` that stay verified (e.g. running statistics kept pinned).
        """
        names = list(names)
        prefixes = tuple(f"{n}." for n in names)
        if self.reference is not None:
            self.reference = {
                k: v for k, v in self.reference.items() if not k.startswith(prefixes) or k in keep
            }
        for name in names:
            self.probes.pop(name, None)
            pending = self._captures.pop(name, None)
            if pending is not None:
                pending[0].remove()

    def check(
        self,
        model: nn.Module,
        modules: Collection[str] | None = None,
        *,
        norm: NormMode = "eval",
        optimizer_params: Iterable[torch.Tensor] = (),
        across_ranks: bool = True,
        probe: ProbeMode = "always",
    ) -> FingerprintDiff | None:
        """Compare every frozen tensor with the reference, each probe output and each rank.

        In a ``torch.distributed`` job the fingerprints of this rank's frozen tensors are compared
        with every other rank's (one 16-byte ``all_gather`` per rank when they agree): a collective,
        so every rank must call :meth:`check` at the same point; ``across_ranks=False`` on one rank.

        Args:
            model: the model whose ``state_dict`` keys the reference uses.
            modules: the modules whose probes run (default: every probe).
            norm: how running-statistics norm layers were frozen (names the likely cause of a change).
            optimizer_params: the optimizers' parameters (names one holding a frozen tensor as the
                likely cause).
            across_ranks: also compare with the other ranks (a collective). Default ``True``.
            probe: ``"always"`` (default): rerun every module on its probe input; ``"if_changed"``:
                skip a module's probe when no frozen tensor changed, the module has no layer that
                would run in train mode, and its
                :func:`~lightning_freeze.core.probe.function_token` equals the one taken when its
                probe last passed (listed in :attr:`probes_skipped`).

        Returns:
            this rank's :class:`~lightning_freeze.core.fingerprint.FingerprintDiff` (also kept as
            :attr:`last_check`), or ``None`` with ``verify="off"`` or before a reference exists.

        Raises:
            FrozenStateError: with ``verify="raise"``, when a frozen tensor changed, a module no
                longer reproduces its probe output, or a rank holds other frozen tensors than the
                others (raised on every rank, naming the rank and the tensors).
            InvalidArgumentError: an unknown ``probe`` (the message lists the choices).
        """
        check_choice("probe", probe, PROBE_MODES)
        if not self.enabled or self.reference is None:
            return None
        reference = self.reference
        tensors, sharded = local_shards(model.state_dict(keep_vars=True))
        current = fingerprint(tensors, [k for k in reference if k in tensors], like=reference)
        diff = diff_fingerprints(reference, current)
        self.last_check = diff
        # collectives: every rank runs them before anything can raise, so no rank is left waiting.
        # Replicated tensors: every rank's fingerprints compared; sharded ones: each rank checked
        # its own shards, and the verdicts are gathered.
        ranks = (
            compare_across_ranks({k: v for k, v in current.items() if k not in sharded})
            if across_ranks
            else {}
        )
        self.last_rank_check = ranks
        shard_changes = (
            gather_changed([k for k in diff.changed if k in sharded])
            if across_ranks and any(k in sharded for k in current)
            else {}
        )
        names = set(self.probes) if modules is None else set(modules)
        mismatches = self._check_probes(model, names, probe, unchanged=not (diff.changed or diff.missing))
        self.last_probe_check = mismatches
        if diff.changed or diff.missing or mismatches or ranks or shard_changes:
            error = self._error(model, diff, mismatches, ranks, shard_changes, norm, list(optimizer_params))
            if self.verify == "raise":
                raise error
            self.warn(str(error))
        return diff

    def state_dict(self) -> dict[str, Any]:
        """``{"fingerprints": {key: [digest, dtype, shape]}, "probes": {name: probe state}}``.

        Plain containers of strings, lists and CPU tensors (loadable with
        ``torch.load(weights_only=True)``); the format ``FreezeBackbone`` checkpoints have always had.
        """
        return {
            "fingerprints": {
                k: [fp.digest, fp.dtype, list(fp.shape)] for k, fp in (self.reference or {}).items()
            },
            "probes": {name: probe.state_dict() for name, probe in self.probes.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], modules: Collection[str] | None = None) -> bool:
        """Take the reference and the probes from :meth:`state_dict` (e.g. of a resumed run).

        Args:
            state: a :meth:`state_dict` (a ``FreezeBackbone`` checkpoint entry of any version: a
                missing ``"fingerprints"`` or ``"probes"`` entry is skipped).
            modules: keep only the probes of these modules (default: all).

        Returns:
            whether ``state`` held a reference (``False``: call :meth:`record`).
        """
        self.probes = {
            name: OutputProbe.from_state_dict(probe)
            for name, probe in (state.get("probes") or {}).items()
            if modules is None or name in modules
        }
        if "fingerprints" not in state:
            return False
        self.reference = fingerprints_from_plain(state["fingerprints"])
        return True

    # ------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------
    def _check_probes(
        self, model: nn.Module, names: set[str], when: ProbeMode, unchanged: bool
    ) -> list[ProbeMismatch]:
        """Run the probes of ``names`` (or skip those whose function token is unchanged); mismatches."""
        mismatches, self.probes_skipped = [], []
        for name, probe in self.probes.items():
            if name not in names:
                continue
            module = model.get_submodule(name)
            token = function_token(module)
            # the one purity rule: a layer that would run in train mode is evidence enough to probe
            pure = not impure_layers(module, name, guards=inherited_guard_rule(model, name))
            if when == "if_changed" and unchanged and pure and self._tokens.get(name) == token:
                self.probes_skipped.append(name)
                continue
            mismatch = probe.check(module, name)
            if mismatch is None:
                self._tokens[name] = token
            else:
                self._tokens.pop(name, None)
                mismatches.append(mismatch)
        return mismatches

    def _error(
        self,
        model: nn.Module,
        diff: FingerprintDiff,
        mismatches: list[ProbeMismatch],
        ranks: dict[int, list[str]],
        shard_changes: dict[int, list[str]],
        norm: NormMode,
        optimizer_params: list[torch.Tensor],
    ) -> FrozenStateError:
        """The report of a failed check: one line per changed tensor/module, with its likely cause."""
        causes = {
            key: likely_cause(model, key, norm=norm, optimizer_params=optimizer_params)
            for key in diff.changed
        }
        causes.update({key: "the tensor disappeared from the model's state_dict" for key in diff.missing})
        lines = [f"  - {key}: {cause}" for key, cause in causes.items()]
        for m in mismatches:
            causes[m.module] = m.reason
            lines.append(f"  - {m}")
        for rank, keys in sorted(ranks.items()):
            for key in keys:
                causes.setdefault(key, f"differs on rank {rank} from the other ranks")
        for rank, keys in sorted(shard_changes.items()):
            for key in keys:
                if key not in causes:
                    causes[key] = f"its shard on rank {rank} changed"
                    lines.append(f"  - {key}: {causes[key]}")
        if ranks:
            lines.append(
                "  - the ranks disagree (frozen tensors must be identical on every rank):\n    "
                + describe_rank_mismatch(ranks).replace("\n", "\n    ")
            )
        message = (
            f"{self.owner}: {len(causes)} frozen tensor(s)/module(s) changed since {self.since} "
            f"({diff.summary()}; {len(mismatches)} of {len(self.probes)} probe output(s) changed"
            + (f"; {len(ranks)} rank(s) differ" if ranks else "")
            + (
                f"; sharded tensors changed on rank(s) {', '.join(map(str, sorted(shard_changes)))}"
                if shard_changes
                else ""
            )
            + "):\n"
            + "\n".join(lines)
        )
        return FrozenStateError(message, changed=list(causes), causes=causes)
