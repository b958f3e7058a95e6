"""Build script.

A plain ``pip install -e .`` (or ``pip install .``) compiles nothing and needs no GPU: the
CUDA extension is JIT-built on first use and cached (``python -m gradclip build`` does it
ahead of the first run). Wheels carry the C++/CUDA sources (``csrc/`` is copied into the
package as ``gradclip/csrc``) so that an installed gradclip can JIT-build too.

``GRADCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds the extension ahead
of time as ``gradclip._C`` (needs torch installed, nvcc and the CUDA toolkit, no GPU; the
GPU architectures are ``$TORCH_CUDA_ARCH_LIST``, else the visible GPUs', else sm_80 and
sm_90).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}


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


ext_modules = []
cmdclass = {"build_py": BuildPyWithSources}
if os.environ.get("GRADCLIP_BUILD_CUDA", "0") == "1":
    extension, build_ext = cuda_extension()
    ext_modules.append(extension)
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
