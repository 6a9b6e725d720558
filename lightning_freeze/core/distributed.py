"""Prove that every process of a ``torch.distributed`` job holds the same tensors (pure PyTorch).

Each rank fingerprints its own tensors (:func:`~lightning_freeze.core.fingerprint.fingerprint`);
:func:`compare_across_ranks` then costs one small collective per check: every rank contributes a
128-bit digest of its whole fingerprint dict (one ``all_gather`` of 16 bytes per rank). Only when
those differ are the full fingerprint dicts gathered, to name which rank differs on which key.

Which rank "differs": for each key, the reference is the fingerprint most ranks hold; on a tie, the
one held by the lowest rank among the tied values. With two ranks every disagreement is a tie, so
rank 0 is the reference and rank 1 is named (nobody can tell which of two ranks is "right"); with
three or more, a single deviating rank is named whichever it is. A key missing on some ranks counts
as a value too (the ranks that lack it, or the ranks that have it extra, are named).

Everything here is a no-op (nothing to compare) when ``torch.distributed`` is not available or not
initialized, or the group has a single rank, so the same code runs in a single-process loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import xxhash

from lightning_freeze.core.bits import is_sharded
from lightning_freeze.core.fingerprint import TensorFingerprint, fingerprints_from_plain

__all__ = [
    "compare_across_ranks",
    "copy_full_into",
    "describe_rank_mismatch",
    "find_differing_ranks",
    "gather_changed",
    "gather_fingerprints",
    "is_sharded",
    "local_shards",
]

_Fingerprints = Mapping[str, TensorFingerprint]
_Plain = dict[str, tuple[str, str, tuple[int, ...]]]


def _is_distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _global_ranks(group: dist.ProcessGroup | None) -> list[int]:
    size = dist.get_world_size(group)
    if group is None:
        return list(range(size))
    return [dist.get_global_rank(group, i) for i in range(size)]


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """CPU for gloo/mpi (and CPU-only machines), the current CUDA device for NCCL-only groups."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _to_plain(fp: _Fingerprints) -> _Plain:
    return {key: (f.digest, f.dtype, tuple(f.shape)) for key, f in fp.items()}


def _summary(fp: _Fingerprints) -> torch.Tensor:
    """128-bit digest of a whole fingerprint dict (key order does not matter), as two int64."""
    hasher = xxhash.xxh3_128()
    for key in sorted(fp):
        f = fp[key]
        hasher.update(f"{key}\0{f.digest}\0{f.dtype}\0{tuple(f.shape)}\n".encode())
    raw = hasher.digest()
    return torch.tensor(
        [int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)],
        dtype=torch.int64,
    )


def gather_fingerprints(
    fp: _Fingerprints, group: dist.ProcessGroup | None = None
) -> list[dict[str, TensorFingerprint]]:
    """Every rank's fingerprints, on every rank (a collective: all ranks of ``group`` must call it).

    Args:
        fp: this rank's fingerprints.
        group: the process group (default: the whole job).

    Returns:
        one dict per rank of ``group``, in group-rank order; ``[dict(fp)]`` when not distributed.
    """
    if not _is_distributed(group):
        return [dict(fp)]
    gathered: list[_Plain | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, _to_plain(fp), group=group)
    return [fingerprints_from_plain(plain) for plain in gathered if plain is not None]


def find_differing_ranks(
    per_rank: Sequence[_Fingerprints], ranks: Sequence[int] | None = None
) -> dict[int, list[str]]:
    """Which rank differs on which key, given every rank's fingerprints (no communication).

    For each key the reference is the fingerprint most ranks hold; on a tie, the one held by the
    lowest rank among the tied values. A missing key is a value like any other.

    Args:
        per_rank: fingerprints of each rank, in rank order.
        ranks: the rank number of each entry (default: ``0 .. len(per_rank) - 1``).

    Returns:
        ``{rank: [keys where it differs from the reference]}``, only ranks that differ, keys in first-seen
        order; ``{}`` when all agree.

    Example::

        >>> from lightning_freeze.core.fingerprint import fingerprint
        >>> a, b = fingerprint({"w": torch.zeros(2)}), fingerprint({"w": torch.ones(2)})
        >>> find_differing_ranks([a, a, b])
        {2: ['w']}
        >>> find_differing_ranks([a, b])
        {1: ['w']}
    """
    ranks = list(range(len(per_rank))) if ranks is None else list(ranks)
    if len(ranks) != len(per_rank):
        raise ValueError(
            f"Got {len(per_rank)} fingerprint dicts but {len(ranks)} ranks: give one rank per dict."
        )
    keys = list(dict.fromkeys(key for fp in per_rank for key in fp))
    result: dict[int, list[str]] = {}
    for key in keys:
        values = [fp.get(key) for fp in per_rank]
        votes = Counter(values)
        top = max(votes.values())
        reference = next(v for v in values if votes[v] == top)  # first in rank order among the tied
        for rank, value in zip(ranks, values, strict=True):
            if value != reference:
                result.setdefault(rank, []).append(key)
    return result


def compare_across_ranks(fp: _Fingerprints, group: dist.ProcessGroup | None = None) -> dict[int, list[str]]:
    """Check that every rank of ``group`` holds the same fingerprints (a collective on every rank).

    One ``all_gather`` of a 16-byte digest of ``fp`` per rank; only when those differ are the full
    dicts gathered (:func:`gather_fingerprints`) to find the keys. Every rank gets the same answer.

    Args:
        fp: this rank's fingerprints (e.g. of its frozen tensors, or of an EMA's shadow), made with
            the same algorithm on every rank.
        group: the process group (default: the whole job).

    Returns:
        ``{global rank: [keys where it differs]}`` (see :func:`find_differing_ranks` for which rank
        is the reference); ``{}`` when all ranks agree, or when ``torch.distributed`` is not
        initialized or the group has one rank.
    """
    if not _is_distributed(group):
        return {}
    device = _collective_device(group)
    mine = _summary(fp).to(device)
    summaries = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(summaries, mine, group=group)
    if all(torch.equal(s, summaries[0]) for s in summaries[1:]):
        return {}
    return find_differing_ranks(gather_fingerprints(fp, group), _global_ranks(group))


def describe_rank_mismatch(mismatch: Mapping[int, Sequence[str]], max_keys: int = 5) -> str:
    """One readable line per differing rank, for an error message.

    Args:
        mismatch: the result of :func:`compare_across_ranks`.
        max_keys: keys listed per rank before "and N more".

    Returns:
        e.g. ``"rank 1 differs on 1 tensor(s): 'backbone.0.weight'"``; ``""`` when nothing differs.

    Example::

        >>> describe_rank_mismatch({1: ["a.weight", "a.bias"]})
        "rank 1 differs on 2 tensor(s): 'a.weight', 'a.bias'"
    """
    lines = []
    for rank, keys in sorted(mismatch.items()):
        shown = ", ".join(repr(k) for k in keys[:max_keys])
        more = f" and {len(keys) - max_keys} more" if len(keys) > max_keys else ""
        lines.append(f"rank {rank} differs on {len(keys)} tensor(s): {shown}{more}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# sharded tensors (DTensor: FSDP2 ``fully_shard``, tensor parallel)
# ----------------------------------------------------------------------------------------------
def local_shards(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Each tensor as this rank holds it, without communication.

    Args:
        tensors: e.g. ``model.state_dict(keep_vars=True)`` of an FSDP2 (``fully_shard``) model.

    Returns:
        ``({key: local tensor}, {keys that were sharded})``: a ``DTensor`` becomes its local shard
        (``to_local()``, a view), any other tensor is returned as it is.

    Example::

        >>> local_shards({"w": torch.zeros(2)})
        ({'w': tensor([0., 0.])}, set())
    """
    local: dict[str, torch.Tensor] = {}
    sharded: set[str] = set()
    for key, tensor in tensors.items():
        if is_sharded(tensor):
            local[key] = tensor.to_local()  # type: ignore[attr-defined]
            sharded.add(key)
        else:
            local[key] = tensor
    return local, sharded


def gather_changed(keys: Sequence[str], group: dist.ProcessGroup | None = None) -> dict[int, list[str]]:
    """Every rank's list of changed keys, on every rank (a collective: all ranks of ``group`` call it).

    For sharded tensors each rank checks only its own shards; this gathers the verdicts (one
    ``all_gather_object`` of the key lists) so that every rank raises the same error.

    Args:
        keys: the keys whose local shard changed on this rank (may be empty).
        group: the process group (default: the whole job).

    Returns:
        ``{global rank: keys}`` for the ranks with changes; ``{0: keys}`` (or ``{}``) when not
        distributed.
    """
    if not _is_distributed(group):
        return {0: list(keys)} if keys else {}
    gathered: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(keys), group=group)
    return {
        rank: list(changed) for rank, changed in zip(_global_ranks(group), gathered, strict=True) if changed
    }


def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``target`` may be sharded and ``value`` a full tensor.

    A full ``value`` is sliced to this rank's shard locally (``distribute_tensor`` with
    ``src_data_rank=None``: every rank holds ``value``, nothing is sent).
    """
    with torch.no_grad():
        if is_sharded(target) and not is_sharded(value):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(
                value.to(device=target.device, dtype=target.dtype),
                target.device_mesh,  # type: ignore[attr-defined]
                target.placements,  # type: ignore[attr-defined]
                src_data_rank=None,
            )
        target.copy_(value)
