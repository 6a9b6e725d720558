"""OutputCache (pure PyTorch): exact outputs, keys that never hit stale entries, stores, refusals."""

from __future__ import annotations

import copy
import io
import multiprocessing
import multiprocessing.queues
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_freeze.core import freeze
from lightning_freeze.core.feature_cache import (
    DiskStore,
    MemoryStore,
    OutputCache,
    UncacheableModuleError,
    sample_keys,
)


def frozen_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten())
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    freeze(net, ["0", "1", "3"])  # BatchNorm and Dropout pinned to eval
    return net


class Pyramid(nn.Module):
    """A frozen multi-output module: a tuple and a dict of tensors."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 2)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> object:
        a, b = self.a(x), self.b(x).double()
        return (a, [b, a * 2]) if self.kind == "tuple" else {"p3": a, "p4": {"deep": b}}


def test_cached_output_is_bitwise_the_module_output_and_second_epoch_hits() -> None:
    net = frozen_backbone()
    x = torch.randn(6, 3, 5, 5)
    expected = net(x)
    with OutputCache(net) as cache:
        first = net(x)
        second = net(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert (cache.stats["hits"], cache.stats["misses"], cache.stats["stored"]) == (6, 6, 6)
    assert cache.stats["bytes"] == 6 * expected[0].numel() * 4
    assert cache.stats["time_saved_s"] > 0


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_multi_output_modules_are_cached_with_their_structure(kind: str) -> None:
    net = Pyramid(kind)
    x = torch.randn(4, 5)
    expected = net(x)
    with OutputCache(net) as cache:
        net(x)
        got = net(x)
    assert cache.stats["hits"] == 4
    assert type(got) is type(expected)
    if kind == "tuple":
        assert isinstance(got[1], list) and torch.equal(got[0], expected[0])
        assert torch.equal(got[1][0], expected[1][0]) and torch.equal(got[1][1], expected[1][1])
        assert got[1][0].dtype == torch.float64
    else:
        assert list(got) == ["p3", "p4"] and torch.equal(got["p3"], expected["p3"])
        assert torch.equal(got["p4"]["deep"], expected["p4"]["deep"])


def test_partly_cached_batch_computes_only_the_missing_samples() -> None:
    net = frozen_backbone()
    x = torch.randn(6, 3, 5, 5)
    with OutputCache(net) as cache:
        stored = net(x[:3])
        mixed = net(x[[4, 0, 5, 2]])
    assert (cache.stats["hits"], cache.stats["misses"]) == (2, 5)
    # rows served from the cache are the stored bits; computed rows match the module closely
    assert torch.equal(mixed[1], stored[0]) and torch.equal(mixed[3], stored[2])
    torch.testing.assert_close(mixed, net(x[[4, 0, 5, 2]]))


def test_other_weights_buffers_modes_and_precisions_never_hit() -> None:
    net = frozen_backbone()
    x = torch.randn(4, 3, 5, 5)
    cache = OutputCache(net, on_uncacheable="disable").attach()
    net(x)
    assert cache.stats["misses"] == 4

    other = frozen_backbone(seed=1).state_dict()
    original = copy.deepcopy(net.state_dict())
    net.load_state_dict(other)  # another checkpoint
    assert torch.equal(net(x), type(net).forward(net, x))
    assert cache.stats["hits"] == 0 and cache.stats["misses"] == 8

    net.load_state_dict(original)
    net(x)
    assert cache.stats["hits"] == 4  # the original weights hit again

    with torch.no_grad():
        net[1].running_var.mul_(2)  # a changed buffer
    assert torch.equal(net(x), type(net).forward(net, x))
    assert cache.stats["hits"] == 4

    with torch.autocast("cpu", dtype=torch.bfloat16):  # another precision
        low = net(x)
        assert torch.equal(low, type(net).forward(net, x))
    assert low.dtype == torch.bfloat16 and cache.stats["hits"] == 4

    assert net[2].training  # not frozen: still in train mode
    net[2].train(False)  # another mode of a submodule (not a stochastic one: still cacheable)
    net(x)
    assert cache.stats["hits"] == 4 and cache.stats["misses"] == 20


def test_writes_through_data_are_seen_after_refresh() -> None:
    net = frozen_backbone()
    x = torch.randn(2, 3, 5, 5)
    with OutputCache(net) as cache:
        net(x)
        net[0].bias.data.add_(1)  # bypasses the version counter
        cache.refresh()
        out = net(x)
    assert cache.stats["hits"] == 0
    assert torch.equal(out, net(x))


def test_a_trainable_module_is_cached_under_no_grad_only() -> None:
    net = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    cache = OutputCache(net, on_uncacheable="disable").attach(check=False)
    with torch.no_grad():  # e.g. validation: the weights cannot change during the call
        net(x)
        assert torch.equal(net(x), type(net).forward(net, x))
    assert cache.stats["hits"] == 4 and cache.enabled
    assert net(x).requires_grad and not cache.enabled  # with grad it would cut the graph: off


def test_refuses_trainable_and_train_mode_modules_with_a_clear_error() -> None:
    trainable = nn.Linear(3, 3)
    with pytest.raises(
        UncacheableModuleError, match=r"Linear is trainable \(2 parameter\(s\) require grad: weight"
    ):
        OutputCache(trainable).attach()
    bn_train = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).requires_grad_(False)
    with pytest.raises(UncacheableModuleError, match=r"1 norm/dropout layer\(s\) in train mode \(1\)"):
        OutputCache(bn_train).attach()
    assert "forward" not in bn_train.__dict__


def test_unfreezing_switches_the_cache_off_once() -> None:
    net = frozen_backbone()
    messages: list[str] = []
    cache = OutputCache(net, on_uncacheable="disable", on_disable=messages.append).attach()
    x = torch.randn(2, 3, 5, 5)
    net(x)
    net[0].requires_grad_(True)
    out = net(x)
    net(x)
    assert out.requires_grad  # computed by the module, with a graph for the unfrozen conv
    assert not cache.enabled and cache.stats["hits"] == 0
    assert len(messages) == 1 and "no longer cacheable" in messages[0] and "0.weight" in messages[0]


def test_detach_restores_the_module_and_copies_are_plain() -> None:
    net = frozen_backbone()
    keys = list(net.state_dict())
    cache = OutputCache(net).attach()
    assert list(net.state_dict()) == keys
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        x = torch.randn(2, 3, 5, 5)
        assert torch.equal(clone(x), net(x))
        buffer = io.BytesIO()
        torch.save(clone, buffer)
    cache.detach()
    assert "forward" not in net.__dict__ and cache.stats["misses"] == 4  # only net(x): copies are plain


def test_budget_full_stops_admitting_new_entries() -> None:
    net = frozen_backbone()
    x = torch.randn(6, 3, 5, 5)
    per_sample = net(x[:1]).numel() * 4
    with OutputCache(net, max_bytes=3 * per_sample) as cache:
        net(x)
        again = net(x)
    assert torch.equal(again[:3], net(x)[:3])
    assert cache.stats["full"] and cache.stats["stored"] == 3 and cache.stats["bytes"] == 3 * per_sample
    assert cache.stats["hits"] == 3 and cache.stats["rejected"] >= 3


def test_disk_store_is_reused_and_corrupt_or_foreign_files_are_rebuilt(tmp_path: Path) -> None:
    net = frozen_backbone()
    x = torch.randn(3, 3, 5, 5)
    with OutputCache(net, store="disk", directory=tmp_path) as first:
        expected = net(x)
    files = sorted(tmp_path.rglob("*.feat"))
    assert len(files) == 3 and first.stats["bytes"] == sum(f.stat().st_size for f in files)

    # a later run (new store object) hits from its first call, bitwise
    with OutputCache(net, store="disk", directory=tmp_path) as later:
        assert torch.equal(net(x), expected)
    assert later.stats["hits"] == 3 and later.stats["bytes"] == first.stats["bytes"]

    # truncated file and a foreign file (another sample's file under this name): never served
    files[0].write_bytes(files[0].read_bytes()[:-7])
    files[1].write_bytes(files[2].read_bytes())
    with OutputCache(net, store="disk", directory=tmp_path) as third:
        assert torch.equal(net(x), expected)
    assert (third.stats["hits"], third.stats["misses"], third.stats["corrupt"]) == (1, 2, 2)
    with OutputCache(net, store="disk", directory=tmp_path) as fourth:  # rebuilt
        assert torch.equal(net(x), expected)
    assert fourth.stats["hits"] == 3 and fourth.stats["corrupt"] == 0
    assert not list(tmp_path.rglob("*.part"))


def _write_entries(directory: str) -> None:
    torch.set_num_threads(1)
    net = frozen_backbone()
    x = torch.randn(64, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with OutputCache(net, store="disk", directory=directory):
        for _ in range(3):
            for i in range(0, 64, 4):
                net(x[i : i + 4])


def test_concurrent_disk_writers_never_corrupt_the_cache(tmp_path: Path) -> None:
    # two processes write the same 64 entries at the same time, then a reader verifies every file
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_entries, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    net = frozen_backbone()
    x = torch.randn(64, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with OutputCache(net, store="disk", directory=tmp_path) as reader:
        out = torch.cat([net(x[i : i + 4]) for i in range(0, 64, 4)])
    assert reader.stats["hits"] == 64 and reader.stats["corrupt"] == 0
    # a writer that found part of a batch stored computed the rest as a smaller batch: the same
    # values up to the last bits of the batched kernel (sequential runs are bitwise, see above)
    torch.testing.assert_close(out, torch.cat([net(x[i : i + 4]) for i in range(0, 64, 4)]))
    assert len(list(tmp_path.rglob("*.feat"))) == 64


def test_sample_keys_depend_on_bits_dtype_and_shape() -> None:
    x = torch.zeros(3, 4)
    x[1, 0] = -0.0
    keys = sample_keys([x])
    assert keys[0] == keys[2] != keys[1]  # -0.0 is another bit pattern
    assert keys[0] != sample_keys([torch.zeros(1, 2, 2)])[0]
    assert keys[0] != sample_keys([torch.zeros(1, 4, dtype=torch.float16)])[0]
    assert len(keys[0]) == 16


def _keys_in_child(x: torch.Tensor, queue: multiprocessing.queues.Queue) -> None:
    queue.put(sample_keys([x]))


def test_large_batches_are_hashed_on_threads_with_the_same_keys_also_after_fork() -> None:
    x = torch.randn(8, 3, 128, 128)  # 1.5 MiB: hashed on torch's intra-op threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = sample_keys([x])
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_keys_in_child, args=(x, queue), daemon=True)
        child.start()
        in_child = queue.get(timeout=60)  # a pool inherited from the parent would hang here
        child.join(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert parallel == [sample_keys([x[i : i + 1]])[0] for i in range(8)] == in_child


def test_bad_arguments_name_the_value_and_the_choices(tmp_path: Path) -> None:
    net = frozen_backbone()
    with pytest.raises(ValueError, match=r"Invalid store='ram'; valid choices: 'memory', 'disk'"):
        OutputCache(net, store="ram")
    with pytest.raises(
        ValueError, match=r"Invalid max_bytes=0; valid choices: None \(no limit\) or an integer > 0"
    ):
        OutputCache(net, max_bytes=0)
    with pytest.raises(ValueError, match=r"store='disk' needs directory=<a writable folder>"):
        OutputCache(net, store="disk")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(
        ValueError, match=rf"Invalid directory='{blocker}/cache' for store='disk': cannot write"
    ):
        DiskStore(blocker / "cache")
    with pytest.raises(ValueError, match=r"Invalid device='cuda'; valid choices: 'cpu', 'output'"):
        OutputCache(net, device="cuda")


def test_memory_store_gather_is_one_tensor_per_leaf_and_keeps_the_entries_bitwise() -> None:
    store = MemoryStore()
    rows = {bytes([i]) * 16: [torch.randn(3), torch.arange(2) + i] for i in range(5)}
    for key, leaves in rows.items():
        store.put(b"s" * 16, key, ["tuple", "T", "T"], [t.clone() for t in leaves])
    order = [bytes([i]) * 16 for i in (3, 0, 4)]
    structure, leaves = store.gather(b"s" * 16, order)
    assert structure == ["tuple", "T", "T"] and [t.shape for t in leaves] == [(3, 3), (3, 2)]
    for row, key in enumerate(order):
        for j, leaf in enumerate(leaves):
            assert torch.equal(leaf[row], rows[key][j])
            assert torch.equal(store.get(b"s" * 16, key)[1][j], rows[key][j])  # re-pointed, same bits
    assert store.gather(b"s" * 16, [*order, b"x" * 16]) is None  # a missing key
    assert store.gather(b"t" * 16, order) is None  # another module key
    generation = store.generation
    store.clear()
    assert store.generation == generation + 1 and store.gather(b"s" * 16, order) is None
