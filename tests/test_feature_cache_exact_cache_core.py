"""OutputCache exactness (pure PyTorch): every argument in the key, outputs rebuilt with their types,
a failing disk store that never changes a result, load_state_dict seen at the next call."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import warnings
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_freeze.core.cache_stores as cache_stores
import lightning_freeze.core.files as files
from lightning_freeze.core.feature_cache import DiskStore, OutputCache

LOGGER = "lightning_freeze.core.feature_cache"


class Scaled(nn.Module):
    """Uses every kind of argument: a nested dict of tensors, a float, a string, a list of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(
        self, x: torch.Tensor, extra: dict[str, Any] | None = None, alpha: float = 1.0, mode: str = "a"
    ) -> torch.Tensor:
        out = self.lin(x) * alpha
        if extra is not None:
            out = out * extra["s"] + extra.get("big", torch.zeros(1)).sum()
            for t in extra.get("more", []):
                out = out + t.sum()
        return out if mode == "a" else -out


def frozen(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p)
    return module.eval().requires_grad_(False)


def test_tensors_inside_dict_arguments_are_keyed_by_their_bits() -> None:
    net = frozen(Scaled())
    x = torch.randn(5, 4)
    cache = OutputCache(net)
    with cache:
        first = net(x, extra={"s": torch.tensor(1.00001)})
        second = net(x, extra={"s": torch.tensor(1.00002)})  # prints as tensor(1.0000) too
    assert torch.equal(second, Scaled.forward(net, x, extra={"s": torch.tensor(1.00002)}))
    assert not torch.equal(first, second)
    assert cache.stats["hits"] == 0 and cache.stats["misses"] == 10


def test_large_tensor_arguments_differing_in_one_element_never_share_a_key() -> None:
    net = frozen(Scaled())
    x = torch.randn(5, 4)
    big = torch.zeros(2000)  # printed with "..." by repr
    other = big.clone()
    other[1000] = 1.0
    cache = OutputCache(net)
    with cache:
        net(x, extra={"s": torch.tensor(1.0), "big": big})
        served = net(x, extra={"s": torch.tensor(1.0), "big": other, "more": []})
        again = net(x, extra={"s": torch.tensor(1.0), "big": other, "more": []})
    truth = Scaled.forward(net, x, extra={"s": torch.tensor(1.0), "big": other})
    assert torch.equal(served, truth) and torch.equal(again, truth)
    assert cache.stats["hits"] == 5  # only the exact repeat hits


def test_constants_are_keyed_exactly() -> None:
    net = frozen(Scaled())
    x = torch.randn(3, 4)
    nearby = float.fromhex("0x1.0000000000001p-1")  # 0.5 plus one ulp
    cache = OutputCache(net)
    with cache:
        a = net(x, alpha=0.5, mode="a")
        b = net(x, alpha=nearby)
        c = net(x, alpha=0.5, mode="b")
        d = net(x, mode="a", alpha=0.5)  # the same call: kwargs order does not matter
    assert torch.equal(b, Scaled.forward(net, x, alpha=nearby))
    assert torch.equal(c, -a) and torch.equal(d, a)
    assert cache.stats["hits"] == 3 and cache.stats["misses"] == 9


def test_an_argument_without_exact_encoding_is_computed_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Opaque:
        def __init__(self, value: float) -> None:
            self.value = value

        def __repr__(self) -> str:
            return "Opaque()"  # the same text for different values

    class UsesOpaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, o: Opaque) -> torch.Tensor:
            return self.lin(x) * o.value

    net = frozen(UsesOpaque())
    x = torch.randn(3, 4)
    cache = OutputCache(net)
    with caplog.at_level(logging.INFO, logger=LOGGER), cache:
        first = net(x, Opaque(1.0))
        second = net(x, Opaque(2.0))
    assert torch.equal(second, 2 * first)
    assert cache.stats["hits"] == 0 and cache.stats["bypassed"] == 2 and cache.enabled
    lines = [r.getMessage() for r in caplog.records if "cannot encode exactly" in r.getMessage()]
    assert len(lines) == 1 and "Opaque" in lines[0]


Pair = namedtuple("Pair", "low high")


@dataclasses.dataclass
class Features:
    low: torch.Tensor
    high: torch.Tensor
    note: str | None = None


class MultiOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.lin(x)
        low, high = y[:, :3], y[:, 3:]
        if self.kind == "namedtuple":
            return Pair(low, high)
        if self.kind == "dataclass":
            return Features(low, high, note="n")
        if self.kind == "odict":
            return OrderedDict([("high", high), ("low", low)])
        if self.kind == "nested":
            return {"p": Pair(low, [high, None]), 3: (low,), "f": 0.25}
        return (low, high)


def _leaves_equal(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _leaves_equal(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _leaves_equal(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _leaves_equal(u, v)
    else:
        assert a == b


@pytest.mark.parametrize("kind", ["tuple", "namedtuple", "dataclass", "odict", "nested"])
def test_a_hit_returns_the_structure_and_types_of_a_miss(kind: str, tmp_path: Path) -> None:
    net = frozen(MultiOut(kind))
    x = torch.randn(4, 4)
    truth = MultiOut.forward(net, x)
    for store in ("memory", "disk"):
        cache = OutputCache(net, store=store, directory=tmp_path / store)
        with cache:
            miss = net(x)
            hit = net(x)
            partly = net(torch.cat([x[:2], torch.randn(2, 4)]))  # a mixed batch is assembled
        assert cache.stats["hits"] == 4 + 2 and cache.enabled
        _leaves_equal(miss, truth)
        _leaves_equal(hit, truth)
        assert type(partly) is type(truth)
        if store == "disk":  # a later run rebuilds it from the files alone
            fresh = OutputCache(net, store=DiskStore(tmp_path / store))
            with fresh:
                _leaves_equal(net(x), truth)
            assert fresh.stats["hits"] == 4


def test_an_output_that_does_not_rebuild_exactly_is_not_cached(caplog: pytest.LogCaptureFixture) -> None:
    @dataclasses.dataclass
    class Derived:
        out: torch.Tensor
        doubled: torch.Tensor = dataclasses.field(init=False)

        def __post_init__(self) -> None:
            self.doubled = self.out * 2

    class ReturnsDerived(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> Derived:
            return Derived(self.lin(x))

    net = frozen(ReturnsDerived())
    x = torch.randn(2, 4)
    cache = OutputCache(net, on_disable=logging.getLogger(LOGGER).info)
    with caplog.at_level(logging.INFO, logger=LOGGER), cache:
        first, second = net(x), net(x)
    assert type(second) is Derived and torch.equal(second.out, first.out)
    assert cache.stats["hits"] == 0 and not cache.enabled
    assert len([r for r in caplog.records if "cannot rebuild exactly" in r.getMessage()]) == 1


def test_hf_model_output_comes_back_as_itself() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval().requires_grad_(False)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    truth = bert(input_ids=ids, attention_mask=mask)
    cache = OutputCache(bert)
    with cache:
        miss = bert(input_ids=ids, attention_mask=mask)
        hit = bert(input_ids=ids, attention_mask=mask)
    assert cache.stats["hits"] == 3
    for out in (miss, hit):
        assert type(out) is type(truth)
        assert list(out.keys()) == list(truth.keys())
        assert torch.equal(out.last_hidden_state, truth.last_hidden_state)
        assert torch.equal(out.pooler_output, truth.pooler_output)
        assert torch.equal(out[0], truth[0])


# ---------------------------------------------------------------------------------------------
# a failing store
# ---------------------------------------------------------------------------------------------
def _fail(*args: Any, **kwargs: Any) -> Any:
    raise OSError(28, "No space left on device")


OPERATIONS = {
    "write": lambda mp: mp.setattr(cache_stores, "write_atomic", _fail),
    "fsync": lambda mp: mp.setattr(files.os, "fsync", _fail),
    "replace": lambda mp: mp.setattr(files.os, "replace", _fail),
    "mkdir": lambda mp: mp.setattr(Path, "mkdir", _fail),
    "read": lambda mp: mp.setattr(cache_stores, "open", _fail, raising=False),
    "scan": lambda mp: mp.setattr(cache_stores.os, "scandir", _fail),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_any_failing_store_operation_turns_the_store_off_with_one_warning(
    operation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = frozen(MultiOut("tuple"))
    batches = [torch.randn(4, 4) for _ in range(3)]
    store = DiskStore(tmp_path)
    cache = OutputCache(net, store=store)
    with cache:
        net(batches[0])  # one stored batch, so that reading has a file to fail on
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if operation == "scan":
                cache.refresh()
                store._held.clear()  # the next call scans the folder again
            OPERATIONS[operation](monkeypatch)
            outs = [net(b) for _ in range(2) for b in batches]
    for out, b in zip(outs, batches * 2, strict=True):
        truth = MultiOut.forward(net, b)
        assert all(torch.equal(o, t) for o, t in zip(out, truth, strict=True))
    ours = [w for w in caught if "disk store" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "No space left on device" in str(ours[0].message) and store.failed


def test_a_real_full_filesystem_never_stops_the_cache(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (container without CAP_SYS_ADMIN?)")
    try:
        net = frozen(nn.Linear(4, 512))
        x = torch.randn(64, 4)  # 64 x 2 KiB of features: more than 64 KiB
        cache = OutputCache(net, store=DiskStore(mountpoint))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cache:
                outs = [net(x[i : i + 8]) for i in range(0, 64, 8)] * 2
                outs += [net(x[i : i + 8]) for i in range(0, 64, 8)]
        truth = nn.Linear.forward(net, x)
        assert torch.equal(torch.cat(outs[:8]), truth) and torch.equal(torch.cat(outs[8:16]), truth)
        ours = [w for w in caught if "disk store" in str(w.message)]
        assert len(ours) == 1 and "No space left on device" in str(ours[0].message)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_load_state_dict_through_a_parent_is_seen_at_the_next_call() -> None:
    parent = nn.Sequential(frozen(nn.Linear(4, 3)))
    net = parent[0]
    other = {k: v + 1 for k, v in parent.state_dict().items()}
    x = torch.randn(2, 4)
    for check in ("call", "refresh"):
        parent.load_state_dict({k: v - 1 for k, v in other.items()})
        cache = OutputCache(net, tensor_check=check)
        with cache:
            before = net(x)
            parent.load_state_dict(other)
            after = net(x)
        assert torch.equal(after, nn.Linear.forward(net, x)) and not torch.equal(before, after)
        assert cache.stats["hits"] == 0


def test_a_crafted_structure_never_calls_a_loaded_callable_that_is_not_its_kind() -> None:
    import subprocess  # noqa: F401  (loaded: a crafted name could reach it)

    from lightning_freeze.core.structure import UnsupportedStructure, unflatten

    crafted = [
        ["dataclass", "subprocess:Popen", [["args", ["const", ["str", "true"]]]], None, None],
        ["namedtuple", "subprocess:Popen", [["const", ["str", "true"]]]],
        ["const", ["enum", "os:system", "x"]],
        ["const", ["dtype", "load"]],
    ]
    for spec in crafted:
        with pytest.raises(UnsupportedStructure):
            unflatten([], spec)
