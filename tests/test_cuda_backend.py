"""What only the CUDA backend does (csrc/ and gradclip/backends/cuda.py).

Without a GPU (CI has nvcc but no GPU) this builds the extension and checks what can be
checked on the host: the registered ops and their schemas, their fake implementations, that
``torch.compile(fullgraph=True)`` traces a clip into the ops, the build command and its
first-use warning, the dtype codes shared with Triton, how the fast path unpacks Python
tensors, the version-counter bookkeeping of the ops that write, and, replayed on the host,
how the kernels split a tensor list among blocks and threads (every element read once,
vectors aligned, 64-bit sizes) and what the ops that write give the kernels (no element to
two threads). The host replays are a test-only module, ``tests/csrc/replay.cpp``, built here
with the ops' packing (``csrc/pack.cpp``) and without CUDA.

With a GPU (``-m gpu``): CUDA graphs, torch.compile, concurrent streams, the eager fast
path (``clip_parameters_``, ``accepts``) against the dispatcher's ops, and the extension's
own errors. What the kernels compute (norms, coefficients, non-finite values, rescaling,
sizes around the chunk edges, several launches, misaligned, empty and strided tensors, more
than 2**31 elements, determinism) is checked for this backend with every other by
``test_backend_contract.py``; host synchronisation in ``test_no_host_sync.py``; ``opcheck``
of the ``gradclip::`` ops in ``test_opcheck.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from reference import assert_stats_match, expected_stats, storage_rtol

import gradclip
from gradclip.backends import cuda_build, get_backend, resolve
from gradclip.backends.base import COEF, DTYPE_CODES, FOUND_INF, NORM, coef_of
from gradclip.backends.cuda import CudaBackend

HAS_CUDA = torch.cuda.is_available()
CAN_BUILD = cuda_build.build_problem() is None or cuda_build.prebuilt_available()
OPS = ("agc_", "clamp_", "clip_grads_", "clip_per_tensor_", "norm_stats", "norm_stats_per_tensor",
       "scale_", "scale_per_tensor_")
SCHEMAS = {
    "norm_stats_per_tensor": "gradclip::norm_stats_per_tensor(Tensor[] tensors, float norm_type, "
                             "float max_norm, Tensor? inv_scale) -> (Tensor, Tensor)",
    "scale_per_tensor_": "gradclip::scale_per_tensor_(Tensor(a!)[] tensors, Tensor coefs) -> ()",
    "clip_per_tensor_": "gradclip::clip_per_tensor_(Tensor(a!)[] tensors, float norm_type, "
                        "float max_norm) -> Tensor",
    "agc_": "gradclip::agc_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps, "
            "float norm_type) -> Tensor",
    "norm_stats": "gradclip::norm_stats(Tensor[] tensors, float norm_type, float max_norm, "
                  "Tensor? inv_scale) -> Tensor",
    "scale_": "gradclip::scale_(Tensor(a!)[] tensors, Tensor scale, Tensor? found_inf) -> ()",
    "clamp_": "gradclip::clamp_(Tensor(a!)[] tensors, float clip_value) -> ()",
    "clip_grads_": "gradclip::clip_grads_(Tensor(a!)[] grads, float norm_type, float max_norm, "
                   "Tensor? inv_scale) -> Tensor",
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHUNK = 64 * 1024  # bytes; csrc/kernels.h kChunkBytes

needs_build = pytest.mark.skipif(not CAN_BUILD, reason=f"cannot build: {cuda_build.build_problem()}")
REPLAY_SOURCE = Path(__file__).resolve().parent / "csrc" / "replay.cpp"
PRODUCTION_ONLY = ("simulate_split", "simulate_agc", "simulate_tensor_slots", "pack_for_writing")


def on_gpu(test):
    """Marks a test ``gpu`` and skips it without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


@pytest.fixture(scope="module")
def ext():
    """The extension, built (or taken from the cache) once per test session."""
    if not CAN_BUILD:
        pytest.skip(f"cannot build the CUDA extension here: {cuda_build.build_problem()}")
    return cuda_build.load_extension()


@pytest.fixture(scope="module")
def replay():
    """The test-only module of host replays (tests/csrc/replay.cpp and the ops' packing,
    csrc/pack.cpp): C++ without CUDA, built once (about a minute), then cached under
    $TORCH_EXTENSIONS_DIR. It is no part of the production extension."""
    folder = cuda_build.source_dir()
    if folder is None or shutil.which("c++") is None:
        pytest.skip("the C++ sources or a C++ compiler are missing")
    from torch.utils import cpp_extension

    return cpp_extension.load(name="gradclip_replay_torch" + re.sub(r"\W", "_", torch.__version__),
                              sources=[str(folder / "pack.cpp"), str(REPLAY_SOURCE)],
                              extra_include_paths=[str(folder)], extra_cflags=["-O2"])


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(2**31)
    print(f"random seed: {seed}")
    return random.Random(seed)


@pytest.fixture
def gen(rng) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**31))


# ---------------------------------------------------------------------------------------
# Without a GPU: build, registration, fakes, tracing, the split of work


def test_status_without_a_device_says_why_and_builds_nothing(monkeypatch):
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")

    def no_build(*args, **kwargs):
        raise AssertionError("status() must not build")

    monkeypatch.setattr(cuda_build, "_jit_build", no_build)
    status = CudaBackend().status()
    assert not status.available
    assert "no CUDA device" in status.reason or "without CUDA" in status.reason


def test_supports_cuda_devices_only():
    backend = CudaBackend()
    assert backend.supports(torch.device("cuda", 0)) and backend.supports(torch.device("cuda"))
    assert not backend.supports(torch.device("cpu")) and not backend.supports(torch.device("meta"))


def test_cuda_home_is_a_toolkit_root(monkeypatch):
    home = cuda_build.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit here")
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
    # A CUDA_HOME that is no toolkit root (nvcc's prefix, say) is passed over.
    monkeypatch.setenv("CUDA_HOME", os.path.dirname(home.rstrip("/")) or "/")
    assert cuda_build.find_cuda_home() is not None
    assert os.path.isfile(os.path.join(cuda_build.find_cuda_home(), "include", "cuda_runtime.h"))


def test_arch_flags(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert cuda_build.arch_flags() == []  # torch reads the variable itself
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    flags = cuda_build.arch_flags()
    if HAS_CUDA:
        major, minor = torch.cuda.get_device_capability()
        assert f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}" in flags
    else:
        assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                         "-gencode=arch=compute_90,code=compute_90"]


def test_missing_nvcc_fails_the_build_command_clearly(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")  # a CPU torch says so first
    monkeypatch.setattr(cuda_build, "find_cuda_home", lambda: None)
    monkeypatch.setattr(cuda_build, "prebuilt_available", lambda: False)
    assert "nvcc" in cuda_build.build_problem()
    assert cuda_build.run(argparse.Namespace(verbose=False, jit=True)) != 0
    assert "nvcc" in capsys.readouterr().err


def test_sources_are_found():
    folder = cuda_build.source_dir()
    assert folder is not None
    for name in cuda_build.SOURCES + cuda_build.HEADERS:
        assert (folder / name).is_file()
    # setuptools names each object after its source's stem (agc.cpp and agc.cu would both
    # make agc.o: the AOT wheel's ninja refuses the build; the JIT build does not mind).
    stems = [Path(name).stem for name in cuda_build.SOURCES]
    assert len(set(stems)) == len(stems), stems
    # Kernels compile without torch headers (compile time).
    for name in ("kernels.cu", "agc_kernels.cu", "kernels.h", "agc.h", "tables.h", "device_helpers.cuh",
                 "kernel_common.cuh"):
        text = (folder / name).read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text, name
    # The binding uses torch's public headers only (torch/csrc/ is torch's internals).
    for name in ("gradclip.cpp", "agc.cpp", "pack.cpp", "python.cpp", "ops.h", "pack.h", "ops_common.h"):
        assert "#include <torch/csrc/" not in (folder / name).read_text(), name
    # The packing the ops and the tests' replay share needs no CUDA.
    for name in ("pack.cpp", "pack.h", "tables.h"):
        text = (folder / name).read_text()
        assert "#include <cuda" not in text and "#include <c10/cuda" not in text, name


def test_backend_module_is_not_imported_by_the_build_module():
    # cuda.py imports cuda_build (to load the extension), never the other way round.
    code = ("import sys, gradclip.backends.cuda_build; "
            "print('gradclip.backends.cuda' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _stand_in_builder(monkeypatch, tmp_path, cached, log):
    """cuda_build with torch's builder replaced by one that appends "compile" to ``log``."""
    from torch.utils import cpp_extension

    def load(**kwargs):
        log.append("compile")
        return "module"

    monkeypatch.setattr(cuda_build, "build_problem", lambda: None)
    monkeypatch.setattr(cuda_build, "find_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(cuda_build, "_use_cuda_home", lambda home: None)
    monkeypatch.setattr(cuda_build, "source_dir", lambda: tmp_path)
    monkeypatch.setattr(cuda_build, "jit_build_is_cached", lambda folder: cached)
    monkeypatch.setattr(cpp_extension, "load", load)


def test_jit_build_warns_before_it_compiles(monkeypatch, tmp_path):
    log: list = []
    _stand_in_builder(monkeypatch, tmp_path, cached=False, log=log)

    def show(message, category, *args, **kwargs):
        log.append((category, str(message)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        assert cuda_build._jit_build(verbose=False) == "module"
    assert len(log) == 2 and log[1] == "compile", log
    category, message = log[0]
    assert category is cuda_build.JitBuildWarning
    assert "python -m gradclip build" in message and "GRADCLIP_BUILD_CUDA=1" in message


@pytest.mark.parametrize("cached, announce", [(True, True), (False, False)])
def test_jit_build_is_quiet_when_cached_or_told(monkeypatch, tmp_path, cached, announce):
    log: list = []
    _stand_in_builder(monkeypatch, tmp_path, cached=cached, log=log)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cuda_build.JitBuildWarning)
        assert cuda_build._jit_build(verbose=False, announce=announce) == "module"
    assert log == ["compile"]


def test_jit_cache_is_fresh_only_when_newer_than_every_source(monkeypatch, tmp_path):
    sources, cache = tmp_path / "csrc", tmp_path / "cache"
    sources.mkdir()
    cache.mkdir()
    for name in cuda_build.SOURCES + cuda_build.HEADERS:
        (sources / name).write_text("//")
    monkeypatch.setattr(cuda_build, "jit_cache_dir", lambda: cache)
    assert not cuda_build.jit_build_is_cached(sources)  # nothing built yet
    library = cache / f"{cuda_build.JIT_NAME}.so"
    library.write_bytes(b"")
    now = time.time()
    os.utime(library, (now, now))
    assert cuda_build.jit_build_is_cached(sources)
    os.utime(sources / "kernels.cu", (now + 10, now + 10))  # a source edited since
    assert not cuda_build.jit_build_is_cached(sources)


@needs_build
def test_extension_builds_and_registers_every_op(ext):
    assert cuda_build.registered_ops() == [f"gradclip::{op}" for op in OPS]
    for op in OPS:
        assert str(getattr(torch.ops.gradclip, op).default._schema) == SCHEMAS[op]


@needs_build
def test_same_op_set_as_the_triton_backend(ext):
    pytest.importorskip("triton")
    import gradclip.backends.triton  # noqa: F401  (registers gradclip_triton::*)

    triton_ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("gradclip_triton::")}
    assert triton_ops and triton_ops <= set(OPS), triton_ops - set(OPS)
    for op in triton_ops:  # the same schema, namespace and alias-set names aside
        ours, theirs = (re.sub(r"\(a\d*!\)", "(a!)", str(getattr(namespace, op).default._schema).split("::")[1])
                        for namespace in (torch.ops.gradclip, torch.ops.gradclip_triton))
        assert ours == theirs


@needs_build
def test_schemas_mark_what_is_written(ext):
    for op, writes in (("norm_stats", False), ("scale_", True), ("clamp_", True), ("clip_grads_", True)):
        schema = getattr(torch.ops.gradclip, op).default._schema
        tensors = schema.arguments[0]
        assert tensors.name == ("grads" if op == "clip_grads_" else "tensors")
        assert (tensors.alias_info is not None and tensors.alias_info.is_write) == writes
        assert all(a.alias_info is None for a in schema.arguments[1:])


@needs_build
def test_the_production_module_has_no_test_hooks(ext, replay):
    """The host replays live in the test-only module (issue 23, item 9)."""
    assert not any(hasattr(ext, name) for name in PRODUCTION_ONLY)
    assert all(hasattr(replay, name) for name in PRODUCTION_ONLY)


@needs_build
def test_dtype_codes_are_the_triton_codes(ext):
    # One table: the CUDA extension's TensorTable codes are base.DTYPE_CODES, as Triton's.
    assert ext.DTYPE_CODES == DTYPE_CODES


@needs_build
def test_fast_path_sees_the_python_tensors(ext):
    """Pins how the fast path unpacks a Python list (THPVariable_Check/Unpack from
    torch/python.h): it must see the very tensors, and each parameter's .grad, that Python
    sees. A torch that changes the unpacking fails here, on the CPU."""
    tensors = [torch.ones(3), torch.nn.Parameter(torch.zeros(2)), torch.empty(0, dtype=torch.bfloat16)]
    for sequence in (tensors, tuple(tensors)):
        seen = ext.unpacked(sequence)
        assert len(seen) == len(tensors) and all(a is b for a, b in zip(seen, tensors))
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2)),
              torch.nn.Parameter(torch.ones(5))]
    params[0].grad, params[2].grad = torch.full((4,), 2.0), torch.full((5,), 3.0)
    grads = ext.unpacked(params, take_grad=True)
    assert len(grads) == 2 and grads[0] is params[0].grad and grads[1] is params[2].grad
    assert ext.unpacked(iter(tensors)) is None  # not a list or tuple: the general path
    assert ext.unpacked(tensors + [3.0]) is None
    assert ext.accepts(tensors) is False  # CPU tensors: the kernels do not take them


def test_ops_that_write_bump_the_version_counters(replay):
    """The kernels write through raw pointers, which autograd cannot see: the ops bump the
    version counter of every tensor they may write, as ATen's in-place ops do (ATen bumps
    the non-dense ones it writes itself). The same packing runs on any device."""
    # (Views share their base's counter: each view here has a base of its own.)
    dense, permuted, empty, strided = torch.ones(5), torch.zeros(6, 8).t(), torch.empty(0), torch.zeros(6, 8)[:, ::2]
    tensors = [dense, permuted, empty, strided]
    before = [t._version for t in tensors]
    assert replay.pack_for_writing(tensors)["aside"] == 1  # the strided view is left to ATen
    assert [t._version - b for t, b in zip(tensors, before)] == [1, 1, 1, 0]
    with torch.inference_mode():
        frozen = torch.ones(3)
        assert replay.pack_for_writing([frozen])["aside"] == 0  # no counter inside inference mode
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        replay.pack_for_writing([frozen])  # as frozen.mul_(2) raises outside it


def test_fakes_are_registered_whichever_module_loads_the_extension():
    if not CAN_BUILD:
        pytest.skip(f"cannot build: {cuda_build.build_problem()}")
    # The backend module imported first, the extension loaded by the build module after.
    code = ("import torch, gradclip.backends.cuda; from gradclip.backends import cuda_build; "
            "cuda_build.load_extension(announce=False); "
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "with FakeTensorMode():\n"
            "    t = [torch.empty(4, dtype=torch.float64, device='cuda')]\n"
            "    print(torch.ops.gradclip.clip_grads_(t, 2.0, 1.0, None).dtype)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.float64"


@needs_build
def test_build_command_prints_the_ops(ext):
    result = subprocess.run([sys.executable, "-m", "gradclip", "build"], capture_output=True,
                            text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"gradclip::{op}" for op in OPS]


@needs_build
@pytest.mark.parametrize("dtypes, stats_dtype", [((torch.bfloat16, torch.float32), torch.float32),
                                                 ((torch.float16, torch.float64), torch.float64)])
def test_fake_norm_stats_has_the_contract_dtype(ext, dtypes, stats_dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        tensors = [torch.empty(4, dtype=d, device="cuda") for d in dtypes]
        stats = torch.ops.gradclip.norm_stats(tensors, 2.0, 1.0, None)
    assert stats.shape == (3,) and stats.dtype == stats_dtype and stats.device.type == "cuda"


@pytest.fixture
def ops_on_cpu(ext, monkeypatch):
    """The gradclip ops given CPU kernels (the reference backend) and the backend allowed on
    the CPU, so that tracing can be tested without a GPU. On a GPU the real kernels are
    traced instead: registering and destroying CPU kernels mid-session is for CPU machines."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the tests on the real kernels cover this")
    reference = get_backend("reference")
    lib = torch.library.Library("gradclip", "IMPL")
    lib.impl("norm_stats", lambda t, p, m, i: reference.norm_stats(list(t), p, m, i), "CPU")
    lib.impl("scale_", lambda t, s, f: reference.scale_(list(t), s, f), "CPU")
    lib.impl("clamp_", lambda t, c: reference.clamp_(list(t), c), "CPU")
    lib.impl("clip_grads_", lambda g, p, m, i: reference.clip_grads_(list(g), p, m, i), "CPU")
    backend = get_backend("cuda")
    monkeypatch.setattr(backend, "supports", lambda device: True)
    monkeypatch.setattr(backend, "status", lambda: gradclip.BackendStatus(True, "test"))
    backend.load()
    yield backend
    lib._destroy()


def _traced_ops(fn, *args):
    """Compile ``fn`` with fullgraph=True; return (result, names of the ops in the graph)."""
    seen: list[str] = []

    def record(gm, example_inputs):
        seen.extend(str(node.target).removesuffix(".default") for node in gm.graph.nodes
                    if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    result = torch.compile(fn, fullgraph=True, backend=record)(*args)
    return result, seen


@needs_build
def test_compile_traces_clip_grad_norm_into_the_ops(ops_on_cpu, gen):
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 300, 7)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3
    expected = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.cat(expected))
    gradclip.clip_grad_norm_(params, 1.0, backend="cuda")  # eager: backend chosen and loaded
    for p, e in zip(params, expected):
        p.grad.copy_(e)

    result, ops = _traced_ops(lambda ps: gradclip.clip_grad_norm_(ps, 1.0, backend="cuda"), params)
    assert "gradclip.clip_grads_" in ops, ops
    torch.testing.assert_close(result, norm)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e / (norm + 1e-6))


@needs_build
def test_compile_traces_the_backend_ops(ops_on_cpu, gen):
    grads = [torch.randn(n, generator=gen) for n in (4, 1000)]
    expected_norm = torch.linalg.vector_norm(torch.cat(grads), 2.0)
    stats, ops = _traced_ops(lambda g: ops_on_cpu.clip_grads_(g, 2.0, 1.0), grads)
    assert "gradclip.clip_grads_" in ops, ops
    torch.testing.assert_close(stats[NORM], expected_norm)
    stats, ops = _traced_ops(lambda g: ops_on_cpu.norm_stats(g, 2.0, 1.0), grads)
    assert ops == ["gradclip.norm_stats"], ops
    _, ops = _traced_ops(lambda g: ops_on_cpu.scale_(g, coef_of(stats)), grads)
    assert "gradclip.scale_" in ops, ops


# What the ops that write give the kernels (issue 21, items 4 and 5), replayed on CPU tensors
# with the ops' own packing: no element goes to two kernel threads, and nothing is written
# (no version counter bumped) before every tensor is checked.

def _spans(entries, dtype_size=4):
    return sorted((ptr, ptr + numel * dtype_size) for ptr, numel in entries if numel)


def _apart(spans) -> bool:
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_an_expanded_tensor_last_is_refused_before_any_counter_moves(replay):
    tensors = [torch.ones(5), torch.ones(3), torch.ones(1, 4).expand(3, 4)]
    before = [t._version for t in tensors]
    for per_tensor in (False, True):
        with pytest.raises(RuntimeError, match=r"tensors\[2\] has elements that share memory"):
            replay.pack_for_writing(tensors, per_tensor)
    assert [t._version for t in tensors] == before
    with pytest.raises(RuntimeError, match=r"grads\[1\] has elements that share memory"):
        replay.pack_agc_for_writing([torch.ones(3, 4)] * 2, [torch.ones(3, 4), tensors[2]])


def test_a_tensor_listed_twice_goes_to_the_kernels_once(replay):
    a, b = torch.ones(100), torch.ones(50)
    # The global ops: the repeat is left to ATen, which multiplies it again after the kernels
    # (each entry in turn, as torch's foreach ops on the CPU); the kernels see it once.
    packed = replay.pack_for_writing([a, b, a])
    assert packed["aside"] == 1 and _spans(packed["entries"]) == _spans([(a.data_ptr(), 100), (b.data_ptr(), 50)])
    # The per-tensor ops: an entry per tensor; the repeat has no chunks and is not written.
    packed = replay.pack_for_writing([a, b, a.view(10, 10)], per_tensor=True)
    assert packed["repeats"] and packed["aside"] == 0
    assert [numel for _, numel in packed["entries"]] == [100, 50, 0]
    # AGC: a gradient listed twice is one tensor of rows in the tables.
    assert replay.pack_agc_for_writing([torch.ones(4, 25)] * 2, [a.view(4, 25)] * 2) == (4, 1, 0)


def test_overlapping_views_never_meet_in_the_kernels(replay, rng):
    """Random views of one buffer (the same ones twice, overlapping ones, disjoint ones):
    the kernels' entries of a global op never overlap, and the rest is left to ATen."""
    storage = torch.zeros(4000)
    for _ in range(20):
        views = []
        for _ in range(rng.randrange(2, 12)):
            start = rng.randrange(0, 3900)
            views.append(storage[start:start + rng.randrange(1, 100)])
        views += rng.sample(views, rng.randrange(0, len(views)))
        packed = replay.pack_for_writing(views)
        assert _apart(_spans(packed["entries"]))
        assert len(packed["entries"]) + packed["aside"] == len(views)


def test_per_tensor_ops_refuse_overlapping_tensors(replay):
    storage = torch.zeros(300)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] and tensors\[2\] overlap in memory"):
        replay.pack_for_writing([torch.ones(3), storage[:200], storage[100:]], per_tensor=True)
    with pytest.raises(RuntimeError, match=r"grads\[0\] and grads\[1\] overlap in memory"):
        replay.pack_agc_for_writing([torch.ones(2, 100)] * 2,
                                    [storage[:200].view(2, 100), storage[100:].view(2, 100)])


def _meta_tensors(rng, count, max_numel=70_000, offsets=True):
    """Meta tensors (no memory: the split only needs addresses and sizes), some of them views
    with a storage offset, i.e. not 16-byte aligned; some empty."""
    tensors = []
    for _ in range(count):
        dtype = rng.choice(DTYPES)
        numel = rng.choice([0, 1, 7, CHUNK // 4, CHUNK // 2, CHUNK // 2 + 1, rng.randrange(max_numel)])
        offset = rng.randrange(9) if offsets else 0
        tensors.append(torch.empty(numel + offset, dtype=dtype, device="meta")[offset:])
    return tensors


@pytest.mark.parametrize("grid", [1, 3, 132, 528, 100_000])
def test_split_reads_every_element_once(replay, rng, grid):
    tensors = _meta_tensors(rng, 60)
    ok, launches, lo, hi = replay.simulate_split(tensors, grid)
    assert ok, "a vector access is misaligned or leaves its tensor"
    assert launches == 1
    assert lo == hi == [1] * len(tensors)


def test_split_of_more_tensors_than_one_launch_holds(replay, rng):
    count = 2 * replay.MAX_TENSORS_PER_LAUNCH + 17
    tensors = _meta_tensors(rng, count, max_numel=300)
    tensors[-1] = torch.empty(0, device="meta")  # a trailing empty tensor
    nonempty = sum(t.numel() > 0 for t in tensors)
    ok, launches, lo, hi = replay.simulate_split(tensors, 528)
    assert ok and lo == hi == [1] * count
    assert launches == -(-nonempty // replay.MAX_TENSORS_PER_LAUNCH)


@pytest.mark.parametrize("grid", [1, 3, 132, 528, 100_000])
def test_per_tensor_norm_slots_line_up(replay, rng, grid):
    """Each (block, tensor) part of the per-tensor norms goes to its own slot, and the
    finaliser reads exactly the slots of the blocks that read its tensor (empty tensors
    and misaligned views included)."""
    assert replay.simulate_tensor_slots(_meta_tensors(rng, 60), grid)


def test_per_tensor_norm_slots_line_up_over_several_launches(replay, rng):
    tensors = _meta_tensors(rng, 2 * replay.MAX_TENSORS_PER_LAUNCH + 17, max_numel=300)
    tensors[-1] = torch.empty(0, device="meta")
    for grid in (7, 528):
        assert replay.simulate_tensor_slots(tensors, grid)


@pytest.mark.slow
def test_split_indexes_past_two_to_the_31(replay):
    # 2**31 + 5 bfloat16 elements, viewed at an odd offset: element and byte offsets
    # beyond int32 on the host replay (the kernels use the same 64-bit helpers).
    big = torch.empty(2**31 + 6, dtype=torch.bfloat16, device="meta")[1:]
    ok, launches, lo, hi = replay.simulate_split([torch.empty(3, device="meta"), big], 528)
    assert ok and lo == hi == [1, 1]


# ---------------------------------------------------------------------------------------
# On a GPU


def _cuda(name="cuda"):
    return resolve(name, torch.device("cuda", torch.cuda.current_device()))


def _random_list(gen, sizes, dtypes, scale=1.0):
    """Fresh normal data on the GPU."""
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)]).cuda()
            for i, n in enumerate(sizes)]


def _random_sizes(rng, count, largest=200_000):
    """Sizes around the chunk edges (in elements of 2, 4 and 8 bytes) and random ones."""
    picks = [0, 1, 3, 1023, CHUNK // 8, CHUNK // 4, CHUNK // 4 + 1, CHUNK // 2, 3 * CHUNK + 5]
    picks = [n for n in picks if n <= largest]
    return [rng.choice(picks) if rng.random() < 0.6 else rng.randrange(1, largest) for _ in range(count)]


@on_gpu
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_capture_and_replay(gen, rng, amp):
    sizes = _random_sizes(rng, 1500, largest=20_000)  # two launches
    grads = _random_list(gen, sizes, [torch.float32, torch.bfloat16])
    backend = _cuda()
    inv = torch.tensor([0.5], device="cuda") if amp else None
    backend.clip_grads_(grads, 2.0, 1.0, inv)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = backend.clip_grads_(grads, 2.0, 1.0, inv)
    for scale in (10.0, 1e-4, 3.0):  # clip, no clip, clip
        fresh = _random_list(gen, sizes, [torch.float32, torch.bfloat16], scale=scale)
        if amp and scale == 3.0:
            fresh[-1].view(-1)[-1] = math.inf
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        assert_stats_match(stats, fresh, 2.0, 1.0, 0.5 if amp else None)
        coef = 1.0 if (amp and stats[FOUND_INF].item()) else stats[COEF].item()
        for g, f in zip(grads, fresh):
            if coef == 1.0:
                assert torch.equal(g, f)
            else:
                torch.testing.assert_close(g, (f.float() * coef).to(f.dtype),
                                           rtol=storage_rtol(f.dtype), atol=0)


@on_gpu
def test_norm_stats_in_a_cuda_graph_follows_the_data(gen):
    tensors = _random_list(gen, [70_000, 9], [torch.float16])
    backend = _cuda()
    backend.norm_stats(tensors, math.inf, 1.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = backend.norm_stats(tensors, math.inf, 1.0)
    for _ in range(3):
        for t in tensors:
            t.normal_()
        graph.replay()
        assert_stats_match(stats, tensors, math.inf, 1.0)


@on_gpu
@pytest.mark.parametrize("amp", [False, True])
def test_torch_compile_fullgraph_clip(gen, amp):
    params = [torch.nn.Parameter(torch.empty(n, device="cuda")) for n in (1000, 70_001, 3)]
    grads = _random_list(gen, [1000, 70_001, 3], [torch.float32], scale=2.0)
    inv = torch.tensor([0.5], device="cuda") if amp else None
    backend = _cuda()

    def clip(ps):
        if amp:
            return backend.clip_grads_([p.grad for p in ps], 2.0, 1.0, inv)
        return gradclip.clip_grad_norm_(ps, 1.0, backend="cuda")

    for p, g in zip(params, grads):
        p.grad = g.clone()
    clip(params)  # eager first: the backend is chosen and loaded
    torch._dynamo.reset()
    compiled = torch.compile(clip, fullgraph=True)
    for _ in range(2):
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        result = compiled(params)
        norm = result[NORM] if amp else result
        expected_norm, coef, _ = expected_stats(grads, 2.0, 1.0, 0.5 if amp else None)
        assert math.isclose(norm.item(), expected_norm, rel_tol=2e-5)
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g * coef, rtol=2e-5, atol=0)


@on_gpu
def test_fast_path_reads_grads_in_cpp(gen):
    ext = cuda_build.load_extension()
    grads = _random_list(gen, [10, 20_000, 3], [torch.float32, torch.bfloat16])
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    params.insert(2, torch.nn.Parameter(torch.empty(7, device="cuda")))  # no grad: skipped
    for p, g in zip([params[0], params[1], params[3]], grads):
        p.grad = g.clone()
    stats = ext.clip_parameters_(params, 2.0, 1.0)
    assert_stats_match(stats, grads, 2.0, 1.0)
    coef = stats[COEF].item()
    for p, g in zip([params[0], params[1], params[3]], grads):
        torch.testing.assert_close(p.grad, (g.float() * coef).to(g.dtype), rtol=storage_rtol(g.dtype), atol=0)
    # What the fast path does not take goes the general way (NotImplemented).
    assert ext.clip_parameters_([torch.nn.Parameter(torch.empty(3))], 2.0, 1.0) is NotImplemented
    cpu = torch.nn.Parameter(torch.empty(3))
    cpu.grad = torch.ones(3)
    assert ext.clip_parameters_(params + [cpu], 2.0, 1.0) is NotImplemented
    assert ext.clip_parameters_([params[2]], 2.0, 1.0) is NotImplemented  # no grads at all
    assert ext.clip_parameters_(iter(params), 2.0, 1.0) is NotImplemented
    assert _cuda().clip_parameters_(iter(params), 2.0, 1.0) is None


@on_gpu
def test_dispatcher_ops_and_fast_path_agree(gen):
    """Eager calls skip the dispatcher (pybind11 entry points); compiled code uses the ops."""
    tensors = _random_list(gen, [1000, 70_001, 3, 0], list(DTYPES), scale=3.0)
    tensors.append(_random_list(gen, [4000], [torch.bfloat16])[0].view(40, 100)[:, ::3])
    backend = _cuda()
    inv = torch.tensor([0.5], device="cuda")
    assert torch.equal(backend.norm_stats(tensors, 2.0, 1.0, inv),
                       torch.ops.gradclip.norm_stats(tensors, 2.0, 1.0, inv))
    copies = [t.clone() for t in tensors]
    factor = torch.tensor([0.3], device="cuda")
    backend.scale_(tensors, factor)
    torch.ops.gradclip.scale_(copies, factor, None)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))
    backend.clamp_(tensors, 0.2)
    torch.ops.gradclip.clamp_(copies, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))
    stats = backend.clip_grads_(tensors, 2.0, 0.5)
    assert torch.equal(stats, torch.ops.gradclip.clip_grads_(copies, 2.0, 0.5, None))
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))
    reference = torch.ops.gradclip.norm_stats(copies, 2.0, 0.5, None)
    torch.ops.gradclip.scale_(copies, coef_of(reference), None)
    assert torch.equal(backend.clip_grads_(tensors, 2.0, 0.5), reference)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


@on_gpu
@pytest.mark.parametrize("op, path", [(op, path) for op in ("scale_", "clamp_", "clip_grads_")
                                      for path in ("fast path", "dispatcher")]
                         + [("clip_parameters_", "fast path")])  # no op: it reads .grad in C++
def test_every_write_bumps_the_grads_version(gen, op, path):
    """As torch's mul_ does, so that autograd sees a gradient changed in place."""
    grads = _random_list(gen, [1000, 70_001, 0], [torch.float32, torch.bfloat16], scale=3.0)
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    grads.append(_random_list(gen, [4000], [torch.float32])[0].view(40, 100)[:, ::3])  # to ATen
    before = [g._version for g in grads]
    ext = cuda_build.load_extension()
    call = {"scale_": lambda f: f(grads, torch.tensor([0.5], device="cuda"), None),
            "clamp_": lambda f: f(grads, 0.1),
            "clip_grads_": lambda f: f(grads, 2.0, 1.0, None),
            "clip_parameters_": lambda f: f(params, 2.0, 1.0, None)}[op]
    result = call(getattr(ext, op) if path == "fast path" else getattr(torch.ops.gradclip, op))
    assert result is not NotImplemented
    written = grads[:3] if op == "clip_parameters_" else grads
    assert all(g._version > b for g, b in zip(written, before)), [g._version for g in grads]


@on_gpu
def test_concurrent_streams(gen):
    backend = _cuda()
    lists = [_random_list(gen, [300_000, 5, 70_000], [torch.float32, torch.bfloat16]) for _ in range(2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    results = []
    for _ in range(20):
        for s, ts in zip(streams, lists):
            with torch.cuda.stream(s):
                results.append(backend.norm_stats(ts, 2.0, 1.0))
    torch.cuda.synchronize()
    for i, stats in enumerate(results):
        assert_stats_match(stats, lists[i % 2], 2.0, 1.0)


@on_gpu
def test_errors_name_the_argument_and_the_fix(gen):
    backend = _cuda()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.ops.gradclip.norm_stats([torch.ones(3)], 2.0, 1.0, None)
    with pytest.raises(RuntimeError, match="tensors\\[1\\] is on cpu"):
        torch.ops.gradclip.norm_stats([torch.ones(3, device="cuda"), torch.ones(3)], 2.0, 1.0, None)
    with pytest.raises(RuntimeError, match="inv_scale"):
        backend.norm_stats([torch.ones(3, device="cuda")], 2.0, 1.0, torch.ones(1))
    with pytest.raises(RuntimeError, match="one element"):
        backend.scale_([torch.ones(3, device="cuda")], torch.ones(2, device="cuda"))
    with pytest.raises(RuntimeError, match="tensors\\[1\\]"):
        backend.norm_stats([torch.ones(3, device="cuda"), torch.ones(2, dtype=torch.int32, device="cuda")],
                           2.0, 1.0)


@on_gpu
def test_accepts_only_lists_the_fast_paths_take_whole(gen):
    backend = _cuda()
    cuda_list = _random_list(gen, [5, 0, 7], list(DTYPES))
    assert backend.accepts(cuda_list) and backend.accepts(tuple(cuda_list))
    assert not backend.accepts([])
    assert not backend.accepts(cuda_list + [torch.randn(3)])  # several devices: split in Python
    assert not backend.accepts(cuda_list + [torch.ones(3, dtype=torch.int32, device="cuda")])
    assert not backend.accepts(cuda_list + [torch.randn(4, 3, device="cuda").to_sparse()])


# AGC's split of rows among warps, replayed on the host (no GPU needed)

@pytest.mark.parametrize("grid", [1, 5, 528])
def test_agc_reads_every_gradient_element_once(replay, rng, grid):
    """agc_'s warps cover each row once (0-d, 1-d, empty, Linear and conv shapes, mixed dtypes)."""
    shapes = [(), (0,), (7,), (0, 3), (3, 0), (33, 5), (4, 3, 3, 3), (2, 70_000), (100_003,)]
    shapes += [(rng.randrange(1, 50), rng.randrange(1, 300)) for _ in range(20)]
    grads = [torch.empty(s, dtype=rng.choice(DTYPES), device="meta") for s in shapes]
    params = [torch.empty(s, dtype=rng.choice(DTYPES), device="meta") for s in shapes]
    assert replay.simulate_agc(params, grads, grid)


def test_agc_rows_over_several_launches(replay, rng):
    count = 2 * replay.MAX_AGC_TENSORS_PER_LAUNCH + 5
    shapes = [(rng.randrange(0, 4), rng.randrange(0, 40)) for _ in range(count)]
    grads = [torch.empty(s, device="meta") for s in shapes]
    assert replay.simulate_agc(grads, grads, 3)
