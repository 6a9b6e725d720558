"""The package as a user gets it: publishable sdist and wheel, a fresh install, and what an import costs."""

from __future__ import annotations

import email
import json
import os
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.metadata import Metadata

REPO = Path(__file__).resolve().parents[1]
SOURCE_VERSION = next(
    line.split("=", 1)[1].strip().strip("\"'")
    for line in (REPO / "lightning_freeze" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)
APP_MODULES = ("hydra", "omegaconf", "joblib")


def _run(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (
        f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_metadata_is_publishable(dists: dict[str, Path]) -> None:
    _run([sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])])

    with zipfile.ZipFile(dists["wheel"]) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        raw = whl.read(name).decode()
    meta = Metadata.from_email(raw, validate=True)  # raises on any invalid field
    assert str(meta.version) == SOURCE_VERSION
    assert meta.license_expression == "Apache-2.0"
    assert meta.license_files == ["LICENSE"]
    assert "License" not in email.message_from_string(raw)  # the deprecated free-text field is gone
    from trove_classifiers import classifiers as valid

    assert meta.classifiers and not set(meta.classifiers) - valid, set(meta.classifiers) - valid
    assert {"Homepage", "Documentation", "Repository", "Issues", "Changelog"} <= set(meta.project_urls)
    requires = {str(r.name): str(r.specifier) for r in meta.requires_dist or [] if r.marker is None}
    # the floors, as constraints/oldest.txt pins them (tests/test_floors.py checks the two agree)
    assert requires["torch"] == ">=2.6" and requires["lightning"] == ">=2.5.3"
    assert requires["torchvision"] == ">=0.21"


def test_version_is_written_once() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    import lightning_freeze

    assert lightning_freeze.__version__ == SOURCE_VERSION


def test_distributions_ship_types_configs_data_and_license(dists: dict[str, Path]) -> None:
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "lightning_freeze" / "conf").rglob("*.yaml")}
    assert len(configs) > 10
    wanted = {*configs, "lightning_freeze/py.typed", "lightning_freeze/data/digits.csv.gz"}

    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    assert not wanted - names, sorted(wanted - names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    with tarfile.open(dists["sdist"]) as tar:
        sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not {*wanted, "LICENSE", "README.md", "pyproject.toml"} - sdist


@pytest.fixture(scope="module")
def installed(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The wheel installed into a fresh venv, imported there step by step in a fresh process.

    Reports where the package came from, its resources, and which of torch, Lightning and the app's
    libraries (Hydra, OmegaConf, joblib) each import step brought in.
    """
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    )
    # torch, Lightning, ... come from this environment (a plain path: its .pth files, such as an
    # editable install of this checkout, are not read); lightning_freeze only from the wheel
    (purelib / "_deps_from_test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(dists["wheel"])])  # fmt: skip
    probe = """
import importlib.metadata, importlib.resources, json, sys
watched = ("torch", "lightning", "hydra", "omegaconf", "joblib")
loaded = lambda: [m for m in watched if m in sys.modules]
steps = {}
import lightning_freeze
steps["import lightning_freeze"] = loaded()
from lightning_freeze import FrozenStateError
from lightning_freeze.core import TrainableEMA
steps["core"] = loaded()
from lightning_freeze import FreezeBackbone, FrozenSafeEMA, load_ema_weights
steps["callbacks"] = loaded()
from lightning_freeze import MultiBranchModule
steps["MultiBranchModule"] = loaded()
package = importlib.resources.files("lightning_freeze")
dist = importlib.metadata.distribution("lightning-freeze")
print(json.dumps({
    "steps": steps,
    "file": lightning_freeze.__file__,
    "version": lightning_freeze.__version__,
    "dist_version": dist.version,
    "dist_at": str(dist.locate_file("")),
    "typed": package.joinpath("py.typed").is_file(),
    "train_yaml": package.joinpath("conf", "train.yaml").is_file(),
    "digits": package.joinpath("data", "digits.csv.gz").is_file(),
    "names": [c.__name__ for c in (FreezeBackbone, FrozenSafeEMA, MultiBranchModule, TrainableEMA)],
}))
"""
    got = json.loads(_run([str(python), "-c", probe], cwd=venv, env=_clean_env()).splitlines()[-1])
    return {**got, "venv": venv, "purelib": purelib}


def test_wheel_installs_into_a_fresh_venv_and_imports(installed: dict) -> None:
    assert Path(installed["file"]).is_relative_to(installed["purelib"])
    assert Path(installed["dist_at"]) == installed["purelib"]
    assert installed["version"] == installed["dist_version"] == SOURCE_VERSION
    assert installed["typed"] and installed["train_yaml"] and installed["digits"]
    assert installed["names"] == ["FreezeBackbone", "FrozenSafeEMA", "MultiBranchModule", "TrainableEMA"]
    for script in ("lightning-freeze", "lightning-freeze-train"):
        assert (installed["venv"] / "bin" / script).is_file()


def test_import_is_free_until_a_name_is_used(installed: dict) -> None:
    steps = installed["steps"]
    assert steps["import lightning_freeze"] == []
    assert steps["core"] == ["torch"]  # the pure-PyTorch core: no Lightning, no app
    assert steps["callbacks"] == ["torch", "lightning"]


def test_multibranch_module_does_not_import_the_app(installed: dict) -> None:
    assert not set(installed["steps"]["MultiBranchModule"]) & set(APP_MODULES)


def test_lazy_names_are_the_public_names() -> None:
    import lightning_freeze
    import lightning_freeze.callbacks

    for package in (lightning_freeze, lightning_freeze.callbacks):
        assert set(package.__all__) - {"__version__"} == set(package._LAZY)
        assert dir(package) == sorted(package.__all__)
    assert lightning_freeze.callbacks.FrozenSafeEMA is lightning_freeze.FrozenSafeEMA
    with pytest.raises(AttributeError, match="has no attribute 'FreezBackbone'"):
        _ = lightning_freeze.FreezBackbone
