"""Packaging: a gradclip installed from the sdist or from an AOT wheel has a working CUDA extension.

- The sdist carries ``csrc/``: installed into a fresh venv, ``python -m gradclip build``
  compiles the extension there (JIT) and lists its ops.
- ``GRADCLIP_BUILD_CUDA=1 pip wheel --no-build-isolation .``, run in that venv on the unpacked
  sdist, gives a wheel with ``gradclip._C`` that requires the torch it was built with;
  installed in that venv in place of the sdist's gradclip, it loads without compiling.

The venv has no system site packages; it gets this torch version from pip's usual source.
Slow (two compiles, a torch install: minutes, about 6 GB of disk while it runs), so it
runs only when asked, as CI does (``.ci/run``):

    GRADCLIP_TEST_PACKAGING=1 python -m pytest -q -s tests/test_packaging.py

Each step prints its time.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from gradclip.backends import cuda_build

REPO = Path(__file__).resolve().parent.parent
TORCH_VERSION = importlib.metadata.version("torch")


@pytest.fixture(scope="module")
def checkout_ops() -> list[str]:
    """The ops the checkout's own extension registers (built, or reused from the JIT cache):
    what an installed gradclip must register too."""
    if cuda_build.build_problem() is not None:
        pytest.skip(f"cannot build the CUDA extension here: {cuda_build.build_problem()}")
    cuda_build.load_extension()
    ops = cuda_build.registered_ops()
    assert "gradclip::norm_stats" in ops, ops
    return ops


# One GPU architecture is enough to prove the packaging and halves nvcc's time (the other
# tests build for the default ones).
ARCH = {"TORCH_CUDA_ARCH_LIST": "8.0"}

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(os.environ.get("GRADCLIP_TEST_PACKAGING") != "1",
                       reason="slow (minutes): set GRADCLIP_TEST_PACKAGING=1 to run"),
]


def run(command: list, cwd: Path, env: dict | None = None, timeout: int = 1800) -> str:
    """Runs ``command``, prints how long it took; returns stdout, fails with its output."""
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    print(f"[{time.perf_counter() - start:6.1f} s] {' '.join(str(c) for c in command[:4])} ...", flush=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result.stdout


def clean_env(python: Path | None = None, **extra: str) -> dict:
    """This environment without what would let a venv see the checkout or choose a build;
    with ``python``, as its venv activated (its ``ninja`` first on the path)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "GRADCLIP_BUILD_CUDA", "GRADCLIP_CUDA_JIT")}
    if python is not None:
        env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    env.update(extra)
    return env


def fresh_venv(path: Path, *requirements) -> Path:
    """A venv without system site packages, with this torch and ``requirements``; its python."""
    run([sys.executable, "-m", "venv", path], cwd=path.parent)
    python = path / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}", *requirements],
        cwd=path.parent, env=clean_env())
    return python


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packaging")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # a venv of torch: gigabytes


@pytest.fixture(scope="module")
def sdist(work) -> Path:
    run([sys.executable, "-m", "build", "--sdist", "--outdir", work / "dist", REPO], cwd=work)
    (archive,) = (work / "dist").glob("gradclip-*.tar.gz")
    return archive


@pytest.fixture(scope="module")
def sdist_venv(work, sdist) -> Path:
    """A fresh venv with gradclip installed from the sdist (and setuptools to build a wheel)."""
    return fresh_venv(work / "venv-sdist", sdist, "setuptools>=77")


def test_sdist_ships_the_extension_sources(sdist):
    with tarfile.open(sdist) as archive:
        names = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}
    for name in cuda_build.SOURCES + cuda_build.HEADERS:
        assert f"csrc/{name}" in names


def test_sdist_install_compiles_the_extension(work, sdist_venv, checkout_ops):
    if cuda_build.build_problem() is not None:
        pytest.skip(f"cannot build the CUDA extension here: {cuda_build.build_problem()}")
    cache = work / "jit-cache"
    env = clean_env(sdist_venv, TORCH_EXTENSIONS_DIR=str(cache), **ARCH)
    where = run([sdist_venv, "-c", "import gradclip; print(gradclip.__file__)"], cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(work / "venv-sdist"), where  # not the checkout
    ops = run([sdist_venv, "-m", "gradclip", "build"], cwd=work, env=env, timeout=1800)
    assert ops.split() == checkout_ops
    assert list(cache.rglob(f"{cuda_build.JIT_NAME}*.so")), "the JIT build is not in its cache"


def test_aot_wheel_loads_without_compiling(work, sdist, sdist_venv, checkout_ops):
    if cuda_build.build_problem() is not None:
        pytest.skip(f"cannot build the CUDA extension here: {cuda_build.build_problem()}")
    source = work / "unpacked"
    with tarfile.open(sdist) as archive:
        archive.extractall(source, filter="data")
    (tree,) = source.iterdir()
    run([sdist_venv, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
         "-w", work / "wheels", "."], cwd=tree, env=clean_env(sdist_venv, GRADCLIP_BUILD_CUDA="1", **ARCH))
    (wheel,) = (work / "wheels").glob("gradclip-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), "a wheel with a compiled extension is platform-specific"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.startswith("gradclip/_C") and n.endswith(".so") for n in names), names
    assert {f"gradclip/csrc/{name}" for name in cuda_build.SOURCES} <= set(names)
    assert f"Requires-Dist: torch=={TORCH_VERSION}" in metadata.splitlines()

    # Into the sdist's venv, gradclip uninstalled first: torch is not installed a third time
    # (a minute), and the JIT cache the sdist test filled is not the one looked at below.
    python = sdist_venv
    run([python, "-m", "pip", "uninstall", "-q", "-y", "gradclip"], cwd=work, env=clean_env(python))
    run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], cwd=work, env=clean_env(python))
    assert f"torch=={TORCH_VERSION}" in run([python, "-m", "pip", "freeze"], cwd=work, env=clean_env(python))
    cache = work / "unused-jit-cache"
    probe = ("import warnings; from gradclip.backends import cuda_build; "
             "warnings.simplefilter('error', cuda_build.JitBuildWarning); "
             "module = cuda_build.load_extension(); "
             "print(module.__name__, *cuda_build.registered_ops())")
    env = clean_env(python, TORCH_EXTENSIONS_DIR=str(cache))
    assert run([python, "-c", probe], cwd=work, env=env).split() == [cuda_build.PREBUILT_NAME] + checkout_ops
    assert not cache.exists() or not any(cache.iterdir())
