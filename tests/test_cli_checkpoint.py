"""``lightning-freeze diff`` / ``merge`` and their pure-PyTorch core, ``lightning_freeze.core.checkpoint``."""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.multibranch import make_module

from lightning_freeze.cli.checkpoint_tools import main as cli
from lightning_freeze.core import checkpoint_io
from lightning_freeze.core.checkpoint import (
    MergeError,
    diff_state_dicts,
    merge_checkpoints,
    tensors_bitwise_equal,
    ulp_distance,
)

CONSOLE_SCRIPT = Path(sys.executable).parent / "lightning-freeze"


def _next_up(value: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(value, torch.full_like(value, float("inf")))


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """Stage-2-like checkpoints: ``b`` and ``c`` share the backbone and branch ``a`` bitwise."""
    torch.manual_seed(0)
    base = make_module(["a"]).state_dict()
    hparams = {"active_branch": "b", "predict_all": False}

    def save(name: str, extra: dict[str, torch.Tensor], state: dict | None = None, **hp) -> Path:
        path = tmp_path / f"{name}.ckpt"
        sd = {**(state if state is not None else base), **extra}
        torch.save({"state_dict": sd, "hyper_parameters": {**hparams, **hp}, "multi_branch": {}}, path)
        return path

    torch.manual_seed(1)
    b = {f"branches.b.{k}": v for k, v in make_module(["b"]).branches["b"].state_dict().items()}
    torch.manual_seed(2)
    c = {f"branches.c.{k}": v for k, v in make_module(["c"]).branches["c"].state_dict().items()}
    moved = dict(base)
    moved["backbone.0.weight"] = base["backbone.0.weight"].clone()
    moved["backbone.0.weight"][3, 2] = _next_up(moved["backbone.0.weight"][3, 2])  # one ulp
    other_a = dict(base)
    other_a["branches.a.0.bias"] = base["branches.a.0.bias"] + 1
    return {
        "stage1": save("stage1", {}, active_branch="a"),
        "b": save("b", b),
        "c": save("c", c, active_branch="c"),
        "b_moved_backbone": save("b_moved_backbone", b, moved),
        "c_other_a": save("c_other_a", c, other_a),
    }


# ------------------------------------------------------------------------------------------------
# ulps and bitwise comparison
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ulp_distance_counts_representable_steps(dtype) -> None:
    x = torch.tensor([1.0, -2.5, 0.0, 3.0], dtype=dtype)
    one_up = _next_up(x)
    three_up = _next_up(_next_up(one_up))
    assert ulp_distance(x, x).tolist() == [0, 0, 0, 0]
    assert ulp_distance(x, one_up).tolist() == [1, 1, 1, 1]
    assert ulp_distance(three_up, x).tolist() == [3, 3, 3, 3]
    # -0.0 and +0.0 differ in their bits: one step apart, as are +0 and the smallest subnormal
    zeros = torch.tensor([-0.0, 0.0], dtype=dtype)
    assert ulp_distance(zeros[:1], zeros[1:]).tolist() == [1]
    assert ulp_distance(zeros[1:], _next_up(zeros[1:])).tolist() == [1]
    assert ulp_distance(torch.tensor([-0.0], dtype=dtype), _next_up(zeros[1:])).tolist() == [2]


def test_ulp_distance_saturates_for_float64_of_opposite_sign_and_rejects_other_dtypes() -> None:
    big = torch.tensor([torch.finfo(torch.float64).max], dtype=torch.float64)
    assert ulp_distance(big, -big).item() == torch.iinfo(torch.int64).max
    with pytest.raises(ValueError, match=r"two floating-point tensors of one dtype.*int64"):
        ulp_distance(torch.tensor([1]), torch.tensor([2]))


def test_bitwise_equality_is_about_bits() -> None:
    assert not tensors_bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))  # torch.equal says equal
    nan = torch.tensor([float("nan")])
    assert tensors_bitwise_equal(nan, nan.clone())  # torch.equal says different
    assert not tensors_bitwise_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not tensors_bitwise_equal(torch.zeros(2), torch.zeros(1, 2))


def test_diff_state_dicts_reports_every_kind_of_difference() -> None:
    a = {
        "same": torch.arange(4.0),
        "moved": torch.tensor([1.0, 2.0, 3.0]),
        "dtype": torch.tensor([1.0, 2.0]),
        "shape": torch.zeros(2, 3),
        "steps": torch.tensor([5, 6]),
        "gone": torch.ones(1),
    }
    b = dict(a, moved=torch.tensor([1.0, 2.5, _next_up(torch.tensor(3.0))]), dtype=a["dtype"].double())
    b.update(shape=torch.zeros(3, 2), steps=torch.tensor([5, 9]), new=torch.ones(2))
    del b["gone"]
    result = diff_state_dicts(a, b)
    by_key = {d.key: d for d in result.differences}
    assert [d.status for d in result.differences] == [
        "changed",
        "dtype",
        "shape",
        "changed",
        "only_a",
        "only_b",
    ]
    assert list(by_key) == ["moved", "dtype", "shape", "steps", "gone", "new"]
    assert by_key["moved"].elements == 2 and by_key["moved"].max_abs == 0.5
    assert by_key["moved"].max_ulps == 2**21  # 2.0 -> 2.5 in float32: 0.5 / 2**-22
    assert by_key["dtype"].elements == 0 and by_key["dtype"].max_abs == 0.0
    assert by_key["steps"].max_abs == 3.0 and by_key["steps"].max_ulps is None
    assert result.compared == 7 and result.identical == 1
    assert not diff_state_dicts(a, a, only=["same", "moved"])
    with pytest.raises(
        ValueError, match=r"pattern 'bakbone' matches no tensor.*top-level names: dtype, gone"
    ):
        diff_state_dicts(a, b, only=["bakbone"])


# ------------------------------------------------------------------------------------------------
# lightning-freeze diff
# ------------------------------------------------------------------------------------------------
def test_diff_exit_codes_and_table(checkpoints, capsys) -> None:
    stage1, b, moved = (str(checkpoints[k]) for k in ("stage1", "b", "b_moved_backbone"))
    assert cli(["diff", stage1, stage1]) == 0
    assert "no differences: all 18 tensors are bitwise identical" in capsys.readouterr().out

    assert cli(["diff", stage1, b, "--only", "backbone"]) == 0
    assert cli(["diff", stage1, b]) == 1
    assert "9 of 27 tensors differ (9 only in B); 18 bitwise identical" in capsys.readouterr().out

    assert cli(["diff", b, moved, "--only", "backbone"]) == 1
    out = capsys.readouterr().out.splitlines()
    header = out[2].split()
    assert header == ["key", "status", "shape", "dtype", "differing", "max_abs_diff", "max_ulps"]
    row = out[3].split()
    assert row[0] == "backbone.0.weight" and row[1] == "changed"
    assert row[-3:-1] == ["1/96", row[-2]] and row[-1] == "1"  # one element, one ulp
    assert float(row[-2]) > 0
    assert out[-1] == "1 of 9 tensors under 'backbone' differ (1 changed); 8 bitwise identical"

    assert cli(["diff", stage1, b, "--only", "branches.*.3.weight"]) == 1
    assert "branches.b.3.weight  only in B" in capsys.readouterr().out


def test_diff_pattern_that_matches_nothing_is_bad_input(checkpoints, capsys) -> None:
    stage1 = str(checkpoints["stage1"])
    assert cli(["diff", stage1, stage1, "--only", "bakbone"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-freeze diff: error: pattern 'bakbone' matches no tensor")
    assert "top-level names: backbone, branches" in err


# ------------------------------------------------------------------------------------------------
# lightning-freeze merge
# ------------------------------------------------------------------------------------------------
def test_merge_keeps_the_shared_branch_once_and_every_new_branch(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "merged.ckpt"
    assert cli(["merge", str(out), str(checkpoints["b"]), str(checkpoints["c"])]) == 0
    text = capsys.readouterr().out
    assert (
        "merged 3 branch(es) on one shared backbone (9 shared tensors, bitwise identical in all 2 inputs)"
        in text
    )
    merged = torch.load(out, weights_only=True)
    sources = [torch.load(checkpoints[k], weights_only=True)["state_dict"] for k in ("b", "c")]
    assert set(merged["state_dict"]) == set(sources[0]) | set(sources[1])
    for key, value in merged["state_dict"].items():
        source = sources[0] if key in sources[0] else sources[1]
        assert tensors_bitwise_equal(value, source[key]), key
    assert merged["multi_branch"]["branch_names"] == ["a", "b", "c"]
    assert merged["hyper_parameters"]["active_branch"] == "b"
    # and it loads into a module with every branch, nothing fresh
    assert make_module(["a", "b", "c"]).init_from_checkpoint(out) == []


def test_merge_refuses_different_backbones_and_colliding_branches(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "merged.ckpt"
    assert cli(["merge", str(out), str(checkpoints["b_moved_backbone"]), str(checkpoints["c"])]) == 2
    err = capsys.readouterr().err
    assert "backbones are not bitwise identical" in err and "'backbone.0.weight'" in err
    assert "lightning-freeze diff" in err and err.count("\n") == 1
    assert cli(["merge", str(out), str(checkpoints["b"]), str(checkpoints["c_other_a"])]) == 2
    err = capsys.readouterr().err
    assert "branch name collision: 'a'" in err and "'branches.a.0.bias'" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file


def test_merge_argument_errors_write_nothing(checkpoints, tmp_path, capsys) -> None:
    b, c = str(checkpoints["b"]), str(checkpoints["c"])
    existing = tmp_path / "existing.ckpt"
    existing.write_bytes(b"keep me")
    assert cli(["merge", str(existing), b, c]) == 2
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert cli(["merge", str(existing), b, c, "--force"]) == 0
    assert make_module(["a", "b", "c"]).init_from_checkpoint(existing) == []
    assert cli(["merge", b, c, str(checkpoints["stage1"])]) == 2  # OUT forgotten: an input taken as OUT
    assert f"OUT {b!r} exists; pass --force" in capsys.readouterr().err
    assert cli(["merge", b, b, c, "--force"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert cli(["merge", str(tmp_path / "out.ckpt"), b]) == 2
    assert "at least two input checkpoints" in capsys.readouterr().err
    assert cli(["merge", str(tmp_path / "no_dir" / "out.ckpt"), b, c]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_merge_writes_atomically(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    def failing_save(obj, handle):
        handle.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", failing_save)
    out = tmp_path / "merged.ckpt"
    before = sorted(tmp_path.iterdir())
    assert cli(["merge", str(out), str(checkpoints["b"]), str(checkpoints["c"])]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {str(out)!r}: No space left on device" in err
    assert sorted(tmp_path.iterdir()) == before  # no OUT, no temporary file


def test_merged_hyper_parameters_rebuild_a_config_built_module(tmp_path) -> None:
    linear = "torch.nn.Linear"

    def hparams(name: str, classes: int) -> dict:
        return {
            "backbone": {"_target_": linear, "in_features": 6, "out_features": 16},
            "branches": {
                "a": {"_target_": linear, "in_features": 16, "out_features": 3},
                name: {"_target_": linear, "in_features": 16, "out_features": classes},
            },
            "active_branch": name,
            "predict_all": False,
        }

    from lightning_freeze import MultiBranchModule

    sources = []
    for name, classes in (("b", 2), ("c", 4)):
        torch.manual_seed(0)  # same backbone and a
        model = MultiBranchModule(**hparams(name, classes))
        torch.manual_seed(ord(name))
        model.branches[name].reset_parameters()
        sources.append({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)})
    merged = merge_checkpoints(sources).checkpoint
    assert list(merged["hyper_parameters"]["branches"]) == ["a", "b", "c"]
    path = tmp_path / "merged.ckpt"
    torch.save(merged, path)
    served = MultiBranchModule.load_from_checkpoint(path)
    assert served.branch_names == ["a", "b", "c"]
    assert torch.equal(served.branches["c"].weight, sources[1]["state_dict"]["branches.c.weight"])
    with pytest.raises(MergeError, match="at least two"):
        merge_checkpoints(sources[:1])


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, no traceback, nothing written
# ------------------------------------------------------------------------------------------------
def _bad_inputs(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\n")
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 40)
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    truncated = tmp_path / "truncated.ckpt"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(data[:200] + bytes(64) + data[264:])  # zeroed bytes inside the zip headers
    bitflip = tmp_path / "bitflip.ckpt"  # one flipped bit in tensor data: torch.load alone accepts it
    with zipfile.ZipFile(good) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    flipped = bytearray(data)
    flipped[entry.header_offset + 30 + name_len + extra_len] ^= 0x01
    bitflip.write_bytes(bytes(flipped))
    a_list = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], a_list)
    no_tensors = tmp_path / "no_tensors.ckpt"
    torch.save({"epoch": 3, "note": "x"}, no_tensors)
    directory = tmp_path / "a_directory.ckpt"
    directory.mkdir()
    return {
        "missing": (tmp_path / "missing.ckpt", "no such file"),
        "text": (text, "not a checkpoint"),
        "noise": (noise, "not a checkpoint"),
        "empty": (empty, "empty file"),
        "truncated": (truncated, "corrupt or truncated"),
        "corrupt": (corrupt, "corrupt"),
        "bitflip": (bitflip, "corrupt checkpoint (CRC-32 mismatch in entry"),
        "list": (a_list, "holds a list, expected a dict"),
        "no_tensors": (no_tensors, "no 'state_dict' entry and no tensors (top-level keys: 'epoch', 'note')"),
        "directory": (directory, "is a directory"),
    }


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(checkpoints, tmp_path, capsys) -> None:
    good = checkpoints["b"]
    work = tmp_path / "bad"
    work.mkdir()
    for name, (path, message) in _bad_inputs(work, good).items():
        before = sorted(work.iterdir())
        for argv in (["diff", str(good), str(path)], ["diff", str(path), str(good), "--only", "backbone"]):
            assert cli(argv) == 2, (name, argv)
            captured = capsys.readouterr()
            assert captured.out == "", name
            assert captured.err.count("\n") == 1 and message in captured.err, (name, captured.err)
            assert str(path) in captured.err, name
        out = work / "merged.ckpt"
        assert cli(["merge", str(out), str(good), str(path)]) == 2, name
        assert message in capsys.readouterr().err, name
        assert sorted(work.iterdir()) == before, name  # no OUT, no temporary file


def test_console_script_prints_one_line_without_traceback(checkpoints, tmp_path) -> None:
    assert CONSOLE_SCRIPT.exists(), "install the package (pip install -e .) to get the console script"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoints["b"].read_bytes()[:1000])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "diff", str(checkpoints["b"]), str(truncated)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("lightning-freeze diff: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [
            str(CONSOLE_SCRIPT),
            "diff",
            str(checkpoints["stage1"]),
            str(checkpoints["b"]),
            "--only",
            "backbone",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("are bitwise identical\n")


def test_pickled_objects_need_unsafe_load(checkpoints, tmp_path, capsys) -> None:
    pickled = tmp_path / "pickled.ckpt"
    state = torch.load(checkpoints["b"], weights_only=True)
    state["hyper_parameters"]["optimizer"] = functools.partial(torch.optim.SGD, lr=0.1)
    torch.save(state, pickled)
    assert cli(["diff", str(checkpoints["b"]), str(pickled)]) == 2
    err = capsys.readouterr().err
    assert "weights_only loading refuses" in err and "--unsafe-load" in err
    assert cli(["diff", str(checkpoints["b"]), str(pickled), "--unsafe-load"]) == 0


# ------------------------------------------------------------------------------------------------
# fixes: branchless merge inputs, OUT's mode, --help without torch, sparse/quantized diff output
# ------------------------------------------------------------------------------------------------
def test_merge_of_checkpoints_without_branches_is_bad_input(checkpoints, tmp_path, capsys) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, plain)
    out = tmp_path / "merged.ckpt"
    before = sorted(tmp_path.iterdir())
    for inputs in ([plain, plain], [checkpoints["b"], plain]):
        assert cli(["merge", str(out), *map(str, inputs)]) == 2
        captured = capsys.readouterr()
        assert captured.err == (
            f"lightning-freeze merge: error: {str(plain)!r} holds no branch tensors (no "
            "'branches.<name>.*' keys; its top-level names: fc): merge combines MultiBranchModule "
            "checkpoints, each with its branches under 'branches.'\n"
        )
        assert sorted(tmp_path.iterdir()) == before  # no OUT, no temporary file


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_merge_output_gets_the_mode_of_a_plain_file_create(checkpoints, tmp_path, umask) -> None:
    out, plain = tmp_path / "merged.ckpt", tmp_path / "plain"
    old = os.umask(umask)
    try:
        plain.write_bytes(b"")
        assert cli(["merge", str(out), str(checkpoints["b"]), str(checkpoints["c"])]) == 0
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o666 & ~umask
    out.chmod(0o640)  # --force over an existing file keeps its mode, as open(path, "wb") does
    assert cli(["merge", str(out), str(checkpoints["b"]), str(checkpoints["c"]), "--force"]) == 0
    assert out.stat().st_mode & 0o777 == 0o640


_HELP_WITHOUT_TORCH = """
import sys
from lightning_freeze.cli.checkpoint_tools import main
for argv in (["--help"], ["diff", "--help"], ["merge", "--help"], ["select", "--help"], ["frobnicate"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "lightning", "hydra", "numpy") if m in sys.modules)
print("heavy:", heavy)
"""


def _variant(checkpoints: dict[str, Path], tmp_path: Path, name: str, shift: float, acc: float) -> Path:
    """Checkpoint ``b`` with branch ``b`` shifted by ``shift`` and a stored ``b/val_acc``."""
    checkpoint = torch.load(checkpoints["b"], weights_only=True)
    for key in [k for k in checkpoint["state_dict"] if k.startswith("branches.b.")]:
        checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + shift
    checkpoint["multi_branch"] = {"metrics": {"b/val_acc": acc, "b/val_loss": 1.0 - acc}}
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


def test_select_subcommand_keeps_the_best_variant(checkpoints, tmp_path, capsys) -> None:
    inputs = [_variant(checkpoints, tmp_path, f"v{i}", i * 0.5, acc) for i, acc in enumerate((0.2, 0.9, 0.5))]
    out = tmp_path / "best.ckpt"
    assert cli(["select", str(out), *map(str, inputs), "--metric", "val_acc", "--mode", "max"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    best = torch.load(out, weights_only=True)["state_dict"]
    winner = torch.load(inputs[1], weights_only=True)["state_dict"]
    assert best.keys() == winner.keys()
    assert all(torch.equal(best[k], winner[k]) for k in winner)


def test_select_subcommand_bad_input_is_one_line_exit_2(checkpoints, tmp_path, capsys) -> None:
    inputs = [_variant(checkpoints, tmp_path, f"v{i}", i * 0.5, 0.5) for i in range(2)]
    out = tmp_path / "best.ckpt"
    assert cli(["select", str(out), *map(str, inputs), "--metric", "test_acc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lightning-freeze select: error: ")
    assert "no metric 'b/test_acc'; its metrics: b/val_acc, b/val_loss" in err
    assert not out.exists()


def test_help_and_usage_errors_do_not_import_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_WITHOUT_TORCH],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=120,
    )
    assert "usage: lightning-freeze" in proc.stdout and "invalid choice: 'frobnicate'" in proc.stderr
    assert "{diff,merge,select}" in proc.stdout and "usage: lightning-freeze select" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "heavy: []"


def test_checkpoint_tools_import_torch_only_inside_the_commands() -> None:
    # the part of the --help contract this module owns: no module-level torch/core import
    import ast

    import lightning_freeze.cli.checkpoint_tools as tools

    tree = ast.parse(Path(tools.__file__).read_text())
    top_level = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [m for m in top_level if m and (m.startswith("torch") or m.startswith("lightning_freeze"))]


def test_diff_of_sparse_and_quantized_checkpoints(tmp_path, capsys) -> None:
    import warnings

    dense = torch.zeros(4, 3)
    dense[1, 2] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized creation is deprecated; sparse loads are validated
        q = torch.quantize_per_tensor(torch.tensor([0.5, 1.0]), 0.5, 0, torch.qint8)
        moved_q = torch.quantize_per_tensor(torch.tensor([0.5, 1.5]), 0.5, 0, torch.qint8)
        torch.save({"sp": dense.to_sparse(), "q": q}, tmp_path / "a.ckpt")
        dense[1, 2] = 2.0
        torch.save({"sp": dense.to_sparse(), "q": moved_q}, tmp_path / "b.ckpt")
        assert cli(["diff", str(tmp_path / "a.ckpt"), str(tmp_path / "a.ckpt")]) == 0
        assert cli(["diff", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["sp", "changed", "(4,", "3)", "float32", "1/12", "1", "8388608"] in rows
    assert ["q", "changed", "(2,)", "qint8", "1/2", "0.5", "-"] in rows
