"""core.checkpoint.ema_state_dict: tied weights get their average under every key."""

from __future__ import annotations

import io

import torch
from torch import nn

from lightning_freeze.core.checkpoint import ema_state_dict


def test_tied_weight_gets_the_average_under_both_keys() -> None:
    model = nn.ModuleDict({"enc": nn.Linear(2, 2, bias=False), "dec": nn.Linear(2, 2, bias=False)})
    model["dec"].weight = model["enc"].weight  # tied: two state_dict keys, one shadow key
    model.add_module("frozen", nn.Linear(2, 2, bias=False))
    averaged = torch.full((2, 2), 0.25)
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "callbacks": {"FrozenSafeEMA{}": {"ema": {"shadow": {"enc.weight": averaged}}}},
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    out = ema_state_dict(checkpoint)
    assert torch.equal(out["enc.weight"], averaged)
    assert torch.equal(out["dec.weight"], averaged)
    assert torch.equal(out["frozen.weight"], model["frozen"].weight.detach())


# ------------------------------------------------------------------------------------------------
# diff: sparse and quantized tensors, chunked comparison, memory
# ------------------------------------------------------------------------------------------------
import os  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lightning_freeze.core import checkpoint_io, state_diff  # noqa: E402
from lightning_freeze.core.bits import tensor_bits  # noqa: E402
from lightning_freeze.core.checkpoint import (  # noqa: E402
    CheckpointError,
    diff_state_dicts,
    load_checkpoint,
    tensors_bitwise_equal,
)
from lightning_freeze.core.fingerprint import tensor_bytes  # noqa: E402


def _saved_and_loaded(tmp_path: Path, name: str, state: dict) -> dict:
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": state}, path)
    return load_checkpoint(path)["state_dict"]


def test_diff_of_sparse_tensors(tmp_path) -> None:
    dense = torch.zeros(6, 5)
    dense[1, 2], dense[4, 0] = 1.5, -2.0
    moved = dense.clone()
    moved[4, 0] = -2.25
    other_position = dense.clone()
    other_position[0, 0] = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR "beta" and the O(nnz) validation notices
        a = _saved_and_loaded(tmp_path, "a", {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr()})
        same = {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr()}
        b = {"coo": moved.to_sparse(), "csr": other_position.to_sparse_csr()}
        assert not diff_state_dicts(a, same)
        # an uncoalesced COO tensor with the same values is the same tensor
        doubled = torch.sparse_coo_tensor([[1, 1, 4], [2, 2, 0]], [1.0, 0.5, -2.0], (6, 5))
        assert tensors_bitwise_equal(a["coo"], doubled)
        result = diff_state_dicts(a, b)
        by_key = {d.key: d for d in result.differences}
    assert [d.status for d in result.differences] == ["changed", "changed"]
    assert by_key["coo"].elements == 1 and by_key["coo"].max_abs == 0.25
    assert by_key["coo"].max_ulps == 2**20  # -2.0 -> -2.25 in float32
    assert by_key["csr"].elements == 1 and by_key["csr"].max_abs == 3.0
    assert by_key["csr"].detail == "stored indices differ"
    layout = diff_state_dicts({"t": dense}, {"t": dense.to_sparse()}).differences[0]
    assert layout.status == "layout" and layout.elements == 0 and layout.max_abs == 0.0
    assert layout.detail == "layout strided -> sparse_coo"


def test_diff_of_quantized_tensors(tmp_path) -> None:
    values = torch.tensor([0.0, 0.5, -1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in torch 2.14

        def q(x: torch.Tensor, scale: float = 0.25, zero_point: int = 8) -> torch.Tensor:
            return torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)

        per_channel = torch.quantize_per_channel(
            torch.ones(2, 3), torch.tensor([0.5, 0.25]), torch.tensor([0, 1]), 0, torch.qint8
        )
        a = _saved_and_loaded(tmp_path, "a", {"q": q(values), "pc": per_channel, "scale": q(values)})
        b = {
            "q": q(values + torch.tensor([0.0, 0.0, 0.5, 0.0])),
            "pc": torch.quantize_per_channel(
                torch.ones(2, 3), torch.tensor([0.5, 0.25]), torch.tensor([0, 1]), 0, torch.qint8
            ),
            "scale": q(values, scale=0.5),
        }
        result = diff_state_dicts(a, b)
        float_side = diff_state_dicts({"q": a["q"]}, {"q": values}).differences
    by_key = {d.key: d for d in result.differences}
    assert list(by_key) == ["q", "scale"] and result.identical == 1  # per-channel: bitwise equal
    assert by_key["q"].status == "changed" and by_key["q"].elements == 1
    assert by_key["q"].max_abs == 0.5 and by_key["q"].max_ulps is None and by_key["q"].detail is None
    # same values, another scale: the integers differ everywhere except at zero
    assert by_key["scale"].elements == 0 and by_key["scale"].max_abs == 0.0
    assert by_key["scale"].detail == "quantization parameters differ (qscheme, scale or zero point)"
    assert float_side[0].status == "dtype" and float_side[0].elements == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.int64])
def test_chunked_comparison_gives_the_whole_tensor_answer(monkeypatch, dtype) -> None:
    torch.manual_seed(0)
    a = (torch.randn(1000) * 100).to(dtype)
    b = a.clone()
    b[3] = b[3] + 1
    b[517] = b[517] * 2  # differences in several chunks
    b[998] = -b[998]
    if a.is_floating_point():
        a[700], b[700] = float("nan"), float("nan")  # same NaN: no difference
    for other in (b, b.to(torch.float64) if not dtype.is_complex else b.to(torch.complex128)):
        whole = diff_state_dicts({"t": a}, {"t": other}).differences[0]
        monkeypatch.setattr(state_diff, "COMPARE_CHUNK", 64)
        chunked = diff_state_dicts({"t": a}, {"t": other}).differences[0]
        monkeypatch.undo()
        assert chunked == whole
        assert whole.elements == 3 and whole.max_abs > 0


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _vm(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak RSS")
def test_diff_of_a_large_changed_tensor_needs_no_whole_tensor_temporaries() -> None:
    # every element changed: the old comparison held float64 and int64 copies of the whole tensor
    # (about 16x its float32 size at once); chunked, the temporaries stay a few MiB
    a = torch.randn(4 << 20)  # 16 MiB
    b = torch.nextafter(a, torch.full_like(a, float("inf")))
    diff_state_dicts({"w": a[:1000]}, {"w": b[:1000]})  # page in the code this needs first
    if not _peak_rss_reset():
        pytest.skip("cannot reset the peak RSS here")
    before = _vm("VmRSS")
    result = diff_state_dicts({"w": a}, {"w": b})
    grown = _vm("VmHWM") - before
    assert result.differences[0].elements == a.numel() and result.differences[0].max_ulps == 1
    assert grown < a.numel() * a.element_size(), f"peak grew by {grown / 2**20:.0f} MiB"


def test_load_checkpoint_maps_the_file_instead_of_copying_it(tmp_path) -> None:
    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1 << 20)}}, path)
    w = load_checkpoint(path, mmap=True)["state_dict"]["w"]
    assert torch.equal(w, torch.ones(1 << 20))
    if os.path.exists("/proc/self/maps"):  # the tensor data is the file, mapped: not a copy in memory
        assert str(path) in Path("/proc/self/maps").read_text()
        del w
        read = load_checkpoint(path)["state_dict"]["w"]  # default: read, nothing left mapped
        assert str(path) not in Path("/proc/self/maps").read_text()
        assert torch.equal(read, torch.ones(1 << 20))


class _Blocked:
    def __reduce__(self):
        return (os.getcwd, ())  # os.getcwd: from a module the torch 2.14 unpickler blocks


def test_refused_pickle_globals_name_unsafe_load_in_both_torch_message_forms(tmp_path) -> None:
    import functools

    not_allowed = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "opt": functools.partial(torch.optim.SGD)}, not_allowed)
    blocked = tmp_path / "blocked.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Blocked()}, blocked)
    expected = {
        not_allowed: "global functools.partial is not on the allow-list",
        blocked: "global posix.getcwd from module posix, which is blocked",
    }
    for path, reason in expected.items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(err.value) == (
            f"{str(path)!r}: it pickles Python objects that weights_only loading refuses ({reason}): "
            "loading them would import and run code named in the file; only if you trust this file, "
            "load it with unsafe_load=True (CLI: --unsafe-load)"
        )
        assert "corrupt" not in str(err.value)
        assert torch.equal(load_checkpoint(path, unsafe_load=True)["state_dict"]["w"], torch.zeros(1))
    # the wording of each torch version, as the message is parsed
    assert checkpoint_io._refused_global("Unsupported global: GLOBAL a.b was not an allowed global") == (
        "global a.b is not on the allow-list"
    )
    assert checkpoint_io._refused_global(
        "Trying to load unsupported GLOBAL nt.system whose module nt is blocked."
    ) == ("global nt.system from module nt, which is blocked")


def test_free_branch_name_never_suggests_a_taken_name() -> None:
    from lightning_freeze.core.keys import free_branch_name

    assert free_branch_name("mod3", ["digit", "parity"]) == "mod3"
    assert free_branch_name("mod3", ["digit", "mod3"]) == "mod3_2"
    assert free_branch_name("mod3", ["mod3", "mod3_2", "mod3_3"]) == "mod3_4"


def test_checkpoint_module_keeps_its_names_importable() -> None:
    # callers written against the single module keep working after the split into one module per job
    from lightning_freeze.core import bits, checkpoint, checkpoint_io, keys, merge, state_diff

    assert checkpoint.load_checkpoint is checkpoint_io.load_checkpoint
    assert checkpoint.diff_state_dicts is state_diff.diff_state_dicts
    assert checkpoint.merge_checkpoints is merge.merge_checkpoints
    assert checkpoint.ulp_distance is bits.ulp_distance
    assert checkpoint.BRANCH_PREFIX == keys.BRANCH_PREFIX == "branches."
    assert all(hasattr(checkpoint, name) for name in checkpoint.__all__)


def test_bitwise_equality_reads_lazy_conjugate_and_negative_views() -> None:
    # z.conj() and torch._neg_view(x) are lazy views (a flag, not new values): the byte view under
    # tensor_bits resolves them, as tensor_bytes does for fingerprints, instead of raising
    z = torch.tensor([1 + 2j, 3 - 4j])
    assert tensors_bitwise_equal(z.conj(), z.conj().resolve_conj())
    assert not tensors_bitwise_equal(z.conj(), z)
    x = torch.tensor([1.0, -2.0])
    negated = torch._neg_view(x)
    assert negated.is_neg()
    assert tensors_bitwise_equal(negated, -x)
    assert not tensors_bitwise_equal(negated, x)
    assert torch.equal(tensor_bits(negated), tensor_bits(-x))
    # one byte view: the fingerprint's bytes are the comparison's bits
    y = torch.randn(3, 4).t()
    assert torch.equal(tensor_bytes(y), tensor_bits(y).view(torch.uint8))
