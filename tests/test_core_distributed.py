"""Fingerprints compared across the ranks of a torch.distributed job (pure PyTorch, gloo on CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_freeze.core.distributed import (
    compare_across_ranks,
    describe_rank_mismatch,
    find_differing_ranks,
    gather_fingerprints,
)
from lightning_freeze.core.fingerprint import fingerprint

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fingerprint_ranks
from helpers.ddp import spawn_gloo_ranks


def test_no_op_without_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    fp = fingerprint({"w": torch.zeros(3)})
    assert compare_across_ranks(fp) == {}
    assert gather_fingerprints(fp) == [fp]


def test_majority_is_the_reference_and_ties_go_to_the_lowest_rank() -> None:
    a = fingerprint({"w": torch.zeros(2), "b": torch.zeros(1)})
    b = fingerprint({"w": torch.ones(2), "b": torch.zeros(1)})
    assert find_differing_ranks([a, a, a]) == {}
    assert find_differing_ranks([a, b, a, a]) == {1: ["w"]}
    assert find_differing_ranks([b, a, a]) == {0: ["w"]}  # rank 0 is outvoted
    assert find_differing_ranks([a, b]) == {1: ["w"]}  # a tie: rank 0's value is the reference
    assert find_differing_ranks([b, a]) == {1: ["w"]}
    assert find_differing_ranks([a, b], ranks=[4, 6]) == {6: ["w"]}
    missing = {"w": a["w"]}
    extra = {**a, "x": a["w"]}
    assert find_differing_ranks([a, missing, a]) == {1: ["b"]}
    assert find_differing_ranks([a, extra, a]) == {1: ["x"]}
    with pytest.raises(ValueError, match="Got 2 fingerprint dicts but 3 ranks"):
        find_differing_ranks([a, b], ranks=[0, 1, 2])


def test_describe_rank_mismatch() -> None:
    keys = [f"k{i}" for i in range(7)]
    text = describe_rank_mismatch({3: ["x"], 1: keys}, max_keys=2)
    assert text == "rank 1 differs on 7 tensor(s): 'k0', 'k1' and 5 more\nrank 3 differs on 1 tensor(s): 'x'"
    assert describe_rank_mismatch({}) == ""


@pytest.mark.distributed
def test_two_gloo_ranks_name_the_rank_and_key_that_differ(tmp_path: Path) -> None:
    assert spawn_gloo_ranks(fingerprint_ranks.main, tmp_path) == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]  # every rank gets the same answer
    got = results[0]
    # equal ranks: one 16-byte all_gather, no full gather
    assert got["identical"] == {"mismatch": {}, "full_gathers": 0}
    assert got["gathered_equal"] is True
    # one flipped bit on rank 1: rank and key named, after one full gather
    assert got["rank1_weight_bit"] == {"mismatch": {"1": ["0.weight"]}, "full_gathers": 1}
    assert got["rank1_buffer_and_missing_key"]["mismatch"] == {"1": ["1.running_var", "3.bias"]}
    # two ranks: a tie, rank 0 is the reference
    assert got["rank0_changed"]["mismatch"] == {"1": ["3.bias"]}
