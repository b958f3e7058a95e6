"""Build script.

A plain ``pip install .`` (or ``pip install -e .``) compiles nothing and needs no GPU: the
CUDA extension is JIT-built on first use and cached (``python -m gradclip build`` does it
ahead of the first run). The sdist carries ``csrc/`` (MANIFEST.in) and wheels carry a copy
of it as ``gradclip/csrc``, so that an installed gradclip can JIT-build too.

``GRADCLIP_BUILD_CUDA=1 pip wheel --no-build-isolation .`` (or ``pip install``) builds the
extension ahead of time as ``gradclip._C`` against the torch installed here (needs nvcc and
the CUDA toolkit, no GPU; the GPU architectures are ``$TORCH_CUDA_ARCH_LIST``, else the
visible GPUs', else sm_80 and sm_90). An extension loads only with the torch it was built
against, so such a wheel requires exactly that torch version. Without
``--no-build-isolation``, pip builds against the newest torch it can install.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}
TORCH = "torch>=2.13"
DEPENDENCIES = ["triton>=3.0; platform_system == 'Linux'", "ninja"]
# Commands that would build the extension (the others, egg_info and sdist, never do).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def csrc_files() -> list[Path]:
    folder = ROOT / CSRC
    return sorted(p for p in folder.iterdir() if p.suffix in SOURCE_SUFFIXES) if folder.is_dir() else []


class BuildPyWithSources(build_py):
    """Copies ``csrc/`` into the built package, so that wheels can JIT-build the extension.
    Editable installs read ``csrc/`` of the checkout instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "gradclip" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in csrc_files():
            shutil.copy2(source, target / source.name)


def cuda_extension():
    """``gradclip._C`` and torch's build_ext, with the flags the JIT build uses."""
    sys.path.insert(0, str(ROOT))
    try:
        from gradclip.backends import cuda_build
    finally:
        sys.path.pop(0)
    home = cuda_build.find_cuda_home()
    if home is None or cuda_build.find_nvcc(home) is None:
        raise SystemExit("GRADCLIP_BUILD_CUDA=1 but nvcc/the CUDA toolkit is not found: install it "
                         "and set CUDA_HOME to its root (the folder with include/cuda_runtime.h and "
                         "lib64/libcudart.so), or build without GRADCLIP_BUILD_CUDA to JIT-build later")
    cuda_build._use_cuda_home(home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cxx, nvcc = cuda_build.compile_flags()
    extension = CUDAExtension(
        name=cuda_build.PREBUILT_NAME,
        sources=[f"{CSRC}/{name}" for name in cuda_build.SOURCES],
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    return extension, BuildExtension


options = {"cmdclass": {"build_py": BuildPyWithSources}, "install_requires": [TORCH] + DEPENDENCIES}
if os.environ.get("GRADCLIP_BUILD_CUDA", "0") == "1":
    if importlib.util.find_spec("torch") is not None:
        extension, build_ext = cuda_extension()
        options["ext_modules"] = [extension]
        options["cmdclass"]["build_ext"] = build_ext
        options["install_requires"] = [f"torch=={importlib.metadata.version('torch')}"] + DEPENDENCIES
    elif BUILD_COMMANDS.intersection(sys.argv[1:]):
        raise SystemExit("GRADCLIP_BUILD_CUDA=1 builds the extension against the installed torch, "
                         "and there is none: install torch first, or build with pip (`pip wheel "
                         "--no-build-isolation .` uses this environment's torch)")
    else:
        # pip's isolated build environment: setuptools hands setup_requires to pip as build
        # requirements; pip installs torch there and runs this script again to build.
        options["setup_requires"] = ["torch"]

setup(**options)
