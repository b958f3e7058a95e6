"""Finding, building and loading the CUDA extension; ``python -m gradclip build``.

The extension is looked for in this order:

1. an ahead-of-time build, ``gradclip._C`` (``GRADCLIP_BUILD_CUDA=1 pip install
   --no-build-isolation -e .``), unless ``GRADCLIP_CUDA_JIT=1``;
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja): compiled on first use
   (a minute or two), cached under ``$TORCH_EXTENSIONS_DIR`` (default
   ``~/.cache/torch_extensions``), one build per torch version, and rebuilt only when a
   source or flag changes.

A JIT build that has to compile says so first, with a :class:`JitBuildWarning` naming the
ways to build ahead of time.

The JIT build needs ``nvcc`` and the CUDA toolkit root (the folder with
``include/cuda_runtime.h`` and ``lib64/libcudart.so``): ``$CUDA_HOME`` or ``$CUDA_PATH``
when they point to one, else found from ``nvcc`` and the usual install folders. The GPU
architectures are ``$TORCH_CUDA_ARCH_LIST`` when set, else those of the visible GPUs,
else sm_80 and sm_90 (plus PTX for newer GPUs).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from .base import BackendUnavailableError

# An extension loads only with the torch it was compiled against, and ninja cannot tell
# when torch changes (its dependency files leave out system headers): one name, hence one
# cache folder, per torch version.
JIT_NAME = "gradclip_cuda_torch" + re.sub(r"\W", "_", torch.__version__)
PREBUILT_NAME = "gradclip._C"
SOURCES = ("gradclip.cpp", "agc.cpp", "pack.cpp", "python.cpp", "kernels.cu", "agc_kernels.cu")
HEADERS = ("tables.h", "kernels.h", "agc.h", "pack.h", "ops.h", "ops_common.h", "device_helpers.cuh",
           "kernel_common.cuh")
DEFAULT_ARCHS = ("8.0", "9.0")
JIT_ENV = "GRADCLIP_CUDA_JIT"

_lock = threading.Lock()
_module: ModuleType | None = None
_load_hooks: list[Callable[[], None]] = []

PREBUILD_HINT = ("to build it ahead of time, run `python -m gradclip build` once (it is then "
                 "cached), or install with `GRADCLIP_BUILD_CUDA=1 pip install --no-build-isolation "
                 "gradclip`")


class JitBuildWarning(UserWarning):
    """The CUDA extension is being compiled on first use (a minute or two, once)."""


def _is_toolkit_root(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    root = Path(path)
    return (root / "include" / "cuda_runtime.h").is_file() and (root / "lib64" / "libcudart.so").exists()


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or ``None``.

    ``$CUDA_HOME``/``$CUDA_PATH`` if they hold a toolkit; else the folders around ``nvcc``
    (torch's own guess, nvcc's prefix, is wrong where nvcc is a wrapper in ``/usr/local/bin``);
    else ``/usr/local/cuda`` and versioned siblings.
    """
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        for path in (nvcc, os.path.realpath(nvcc)):
            prefix = os.path.dirname(os.path.dirname(path))
            candidates += [prefix, os.path.join(prefix, "cuda")]
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates.append("/opt/cuda")
    for candidate in candidates:
        if _is_toolkit_root(candidate):
            return os.path.realpath(candidate) if os.path.islink(candidate) else candidate
    return None


def find_nvcc(cuda_home: str | None = None) -> str | None:
    """The ``nvcc`` the JIT build will run (``$CUDA_HOME/bin/nvcc``), or ``None``."""
    home = cuda_home if cuda_home is not None else find_cuda_home()
    if home is None:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    return nvcc if os.access(nvcc, os.X_OK) else None


def source_dir() -> Path | None:
    """The folder with the C++/CUDA sources: inside the installed package (wheels carry a
    copy in ``gradclip/csrc``), else ``csrc/`` of the source checkout."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "csrc", package.parent / "csrc"):
        if all((folder / name).is_file() for name in SOURCES + HEADERS):
            return folder
    return None


def prebuilt_available() -> bool:
    """Whether an ahead-of-time build is installed (and not overridden by ``$GRADCLIP_CUDA_JIT``)."""
    if os.environ.get(JIT_ENV, "") == "1":
        return False
    try:
        return importlib.util.find_spec(PREBUILT_NAME) is not None
    except (ImportError, ValueError):
        return False


def build_problem() -> str | None:
    """Why a JIT build cannot start here, or ``None`` if it can (cheap, builds nothing)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if source_dir() is None:
        return "the C++/CUDA sources (csrc/) are not found next to the package"
    home = find_cuda_home()
    if home is None:
        return ("nvcc/the CUDA toolkit is not found: install the CUDA toolkit and set CUDA_HOME "
                "to its root (the folder with include/cuda_runtime.h and lib64/libcudart.so)")
    if find_nvcc(home) is None:
        return f"CUDA_HOME={home} has no bin/nvcc; point CUDA_HOME to a full CUDA toolkit"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is not installed (pip install ninja)"
    return None


def arch_flags() -> list[str]:
    """nvcc ``-gencode`` flags, or ``[]`` when ``$TORCH_CUDA_ARCH_LIST`` is set (torch reads it)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    archs: list[str] = []
    ptx = False
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            archs.append(f"{major}{minor}")
    else:
        archs = [a.replace(".", "") for a in DEFAULT_ARCHS]
        ptx = True
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted(set(archs))]
    if ptx:
        top = max(archs, key=int)
        flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def compile_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags). No fast-math: the clip coefficient must round as torch's."""
    cxx = ["-O3"]
    nvcc = ["-O3", "-lineinfo"] + arch_flags()
    return cxx, nvcc


def _use_cuda_home(home: str) -> None:
    """Make torch.utils.cpp_extension use ``home``; it guesses its CUDA_HOME at import."""
    os.environ.setdefault("CUDA_HOME", home)
    if not _is_toolkit_root(os.environ["CUDA_HOME"]):
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home


def jit_cache_dir() -> Path | None:
    """The folder of the JIT build (under ``$TORCH_EXTENSIONS_DIR``), or ``None`` if torch
    does not say (it is torch's private helper)."""
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(JIT_NAME, verbose=False))
    except Exception:  # a torch that renamed or changed it: only the message depends on it
        return None


def jit_build_is_cached(folder: Path) -> bool:
    """Whether the JIT cache holds a build newer than the sources in ``folder`` (the cache
    folder is this torch version's), so that loading takes seconds. For the message only:
    ninja decides."""
    cache = jit_cache_dir()
    library = cache / f"{JIT_NAME}.so" if cache is not None else None
    if library is None or not library.is_file():
        return False
    built = library.stat().st_mtime
    return all((folder / name).stat().st_mtime <= built for name in SOURCES + HEADERS)


def _jit_build(verbose: bool, announce: bool = True) -> ModuleType:
    problem = build_problem()
    if problem is not None:
        raise BackendUnavailableError(f"cannot build the CUDA extension: {problem}")
    home = find_cuda_home()
    assert home is not None
    _use_cuda_home(home)
    from torch.utils import cpp_extension

    folder = source_dir()
    assert folder is not None
    if announce and not jit_build_is_cached(folder):
        warnings.warn(f"gradclip: compiling the CUDA extension now, on first use (1-2 min on a "
                      f"few cores, then cached in {jit_cache_dir()}); {PREBUILD_HINT}",
                      JitBuildWarning, stacklevel=2)
    cxx, nvcc = compile_flags()
    try:
        return cpp_extension.load(
            name=JIT_NAME,
            sources=[str(folder / name) for name in SOURCES],
            extra_include_paths=[str(folder)],
            extra_cflags=cxx,
            extra_cuda_cflags=nvcc,
            with_cuda=True,
            verbose=verbose,
        )
    except Exception as error:  # the compiler's output is in the message
        raise BackendUnavailableError(f"building the CUDA extension failed: {error}") from error


def load_extension(verbose: bool = False, jit: bool = False, announce: bool = True) -> ModuleType:
    """The loaded extension module (its ops are then ``torch.ops.gradclip.*``).

    Loads the ahead-of-time build if present (unless ``jit``), else JIT-builds (or reuses
    the cache); a build that must compile warns first (:class:`JitBuildWarning`) unless
    ``announce`` is false. Raises :class:`BackendUnavailableError` with the reason, the
    compiler's output included, when it cannot.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            if not jit and prebuilt_available():
                try:
                    _module = importlib.import_module(PREBUILT_NAME)
                except ImportError as error:
                    raise BackendUnavailableError(
                        f"the prebuilt extension {PREBUILT_NAME} does not load ({error}); rebuild it "
                        f"for this torch, or set {JIT_ENV}=1 to JIT-build instead") from error
            else:
                _module = _jit_build(verbose, announce)
            for hook in _load_hooks:
                hook()
            _load_hooks.clear()
    return _module


def when_loaded(hook: Callable[[], None]) -> None:
    """Call ``hook()`` once the extension is loaded: now if it is, else right after it loads
    (the backend module registers its fake implementations so)."""
    with _lock:
        if _module is None:
            _load_hooks.append(hook)
            return
    hook()


def loaded_module() -> ModuleType | None:
    """The extension if already loaded in this process, else ``None`` (loads nothing)."""
    return _module


def registered_ops() -> list[str]:
    """The ``gradclip::`` ops registered in this process, sorted."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("gradclip::"))


# ``python -m gradclip build``

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--jit", action="store_true",
                        help=f"JIT-build even if {PREBUILT_NAME} is installed (same as {JIT_ENV}=1)")


def run(args: argparse.Namespace) -> int:
    problem = None if (prebuilt_available() and not args.jit) else build_problem()
    if problem is not None:
        print(f"gradclip build: cannot build the CUDA extension: {problem}", file=sys.stderr)
        return 1
    print("gradclip build: loading the CUDA extension (compiling takes 1-2 min the first time)...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = load_extension(verbose=args.verbose, jit=args.jit, announce=False)
    except BackendUnavailableError as error:
        print(f"gradclip build: {error}", file=sys.stderr)
        return 1
    print(f"gradclip build: {module.__name__} from {module.__file__} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for name in registered_ops():
        print(name)
    return 0
