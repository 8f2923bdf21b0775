"""The CUDA-on-CPU emulator itself: correct kernels pass in every thread order, deliberate bugs are caught.

The kernels live in tests/emulator_kernels/: good.cu (each must match NumPy) and bad.cu (each has one
known bug the emulator must expose, by an error, a NaN or a wrong result).
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from gpucnn.emulator import build as emu
from gpucnn.emulator import EmulatedModule, EmulatorBuildError, EmulatorError, EmulatorRuntime, SharedMemoryError
from gpucnn.emulator.build import parse_source

pytestmark = pytest.mark.emulator

KERNELS = Path(__file__).parent / "emulator_kernels"
ORDERS = ("forward", "reverse", "random")
i32 = np.int32


@pytest.fixture(scope="module", params=ORDERS)
def good(request):
    return EmulatedModule(KERNELS / "good.cu", order=request.param, seed=7)


def matmul_missing_second_sync() -> str:
    """good.cu's matmul_tiled without the barrier after the inner product: the next tile overwrites
    what other threads still read."""
    good_source = (KERNELS / "good.cu").read_text()
    start = good_source.index('extern "C" __global__ void matmul_tiled(')
    kernel = good_source[start:good_source.index("\n}\n", start) + 3]
    last_barrier = kernel.rindex("__syncthreads();")
    broken = kernel[:last_barrier] + kernel[last_barrier + len("__syncthreads();"):]
    assert broken.count("__syncthreads();") == 1
    return "\n// BUG: no __syncthreads after the inner product.\n" + broken.replace("matmul_tiled(", "matmul_missing_second_sync(")


@pytest.fixture(scope="module")
def bad_modules(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad-kernels") / "bad.cu"
    path.write_text((KERNELS / "bad.cu").read_text() + matmul_missing_second_sync())
    return {order: EmulatedModule(path, order=order, seed=7) for order in ORDERS}


@pytest.fixture(scope="module", params=ORDERS)
def bad(request, bad_modules):
    return bad_modules[request.param]


def poisoned(shape, dtype=np.float32):
    return EmulatorRuntime().empty(shape, dtype)


def run_matmul(module, name, a, b):
    m, k = a.shape
    n = b.shape[1]
    c = poisoned((m, n))
    module.get_function(name)((-(-n // 16), -(-m // 16), 1), (16, 16, 1), (a, b, c, i32(m), i32(n), i32(k)))
    return c


# ---- correct kernels, every order ------------------------------------------------------------

def test_vector_add_with_a_grid_that_overshoots(good):
    rng = np.random.default_rng(0)
    n = 1000  # 4 blocks of 256: the last block has 24 idle threads
    a, b = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    c = poisoned(n)
    good.get_function("vector_add")((4, 1, 1), (256, 1, 1), (a, b, c, i32(n)))
    np.testing.assert_array_equal(c, a + b)


def test_tiled_matmul_matches_numpy(good):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 70), dtype=np.float32)
    b = rng.standard_normal((70, 50), dtype=np.float32)
    c = run_matmul(good, "matmul_tiled", a, b)
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [96, 256])
def test_block_reduction_with_shuffles_and_shared_memory(good, threads):
    x = np.random.default_rng(2).standard_normal(10_000, dtype=np.float32)
    blocks = 7
    partial = poisoned(blocks)
    good.get_function("block_reduce_sum")((blocks, 1, 1), (threads, 1, 1), (x, partial, i32(x.size)))
    assert np.isfinite(partial).all()
    np.testing.assert_allclose(partial.sum(dtype=np.float64), x.sum(dtype=np.float64), rtol=0, atol=2e-3)


def test_extern_shared_memory(good):
    n, threads = 300, 128
    x = np.arange(n, dtype=np.float32) + 1
    y = poisoned(n)
    good.get_function("reverse_chunks")((3, 1, 1), (threads, 1, 1), (x, y, i32(n)), shared_mem=threads * 4)
    padded = np.zeros(3 * threads, np.float32)
    padded[:n] = x
    np.testing.assert_array_equal(y, padded.reshape(3, threads)[:, ::-1].reshape(-1)[:n])


def test_constant_memory_from_initializer_and_from_python(good):
    x = np.linspace(-2, 2, 50, dtype=np.float32)
    y = poisoned(50)
    kernel = good.get_function("poly_eval")
    kernel((1, 1, 1), (64, 1, 1), (x, y, i32(50)))
    np.testing.assert_allclose(y, 1 - 2 * x + 0.5 * x**2 + 3 * x**3, rtol=1e-5, atol=1e-5)

    coeffs = good.get_global("poly_coeffs")
    assert coeffs.dtype == np.float32 and coeffs.shape == (4,)
    saved = coeffs.copy()
    try:
        coeffs[:] = [0.0, 1.0, 0.0, -1.0]
        kernel((1, 1, 1), (64, 1, 1), (x, y, i32(50)))
        np.testing.assert_allclose(y, x - x**3, rtol=1e-5, atol=1e-5)
    finally:
        coeffs[:] = saved


def test_atomics_across_blocks(good):
    rng = np.random.default_rng(3)
    n = 5000
    values = rng.integers(0, 10, n).astype(np.int32)
    x = rng.random(n, dtype=np.float32)
    bins, total, biggest = np.zeros(10, np.int32), np.zeros(1, np.float32), np.full(1, -1, np.int32)
    good.get_function("atomics")((20, 1, 1), (256, 1, 1), (values, x, bins, total, biggest, i32(n)))
    np.testing.assert_array_equal(bins, np.bincount(values, minlength=10))
    assert biggest[0] == values.max()
    np.testing.assert_allclose(total[0], x.sum(dtype=np.float64), rtol=1e-5)


def test_warp_votes_scans_and_butterflies(good):
    x = np.random.default_rng(4).integers(-3, 4, 128).astype(np.int32)
    x[32:64] = 1  # a warp where every vote is true
    ballots, any_, all_ = np.zeros(4, np.uint32), np.zeros(4, np.int32), np.zeros(4, np.int32)
    scan, total, count = poisoned(128, np.int32), poisoned(128, np.int32), poisoned(2, np.int32)
    good.get_function("warp_ops")((2, 1, 1), (64, 1, 1), (x, ballots, any_, all_, scan, total, count))
    warps = x.reshape(4, 32)
    positive = warps > 0
    np.testing.assert_array_equal(ballots, (positive * (1 << np.arange(32, dtype=np.uint64))).sum(1))
    np.testing.assert_array_equal(any_, positive.any(1))
    np.testing.assert_array_equal(all_, positive.all(1))
    np.testing.assert_array_equal(scan.reshape(4, 32), np.cumsum(warps, axis=1))
    np.testing.assert_array_equal(total.reshape(4, 32), np.repeat(warps.sum(1, keepdims=True), 32, axis=1))
    np.testing.assert_array_equal(count, (x.reshape(2, 64) > 0).sum(1))


@pytest.mark.parametrize("src", [3, 11])
def test_shuffle_within_segments_of_width_8(good, src):
    x = np.arange(32, dtype=np.float32)
    y = poisoned(32)
    good.get_function("shuffle_segments")((1, 1, 1), (32, 1, 1), (x, y, i32(src)))
    np.testing.assert_array_equal(y, (np.arange(32) // 8) * 8 + src % 8)


def test_three_dimensional_grid_and_block(good):
    grid, block = (3, 2, 2), (4, 3, 2)
    out = poisoned((12, 24, 6), np.int32)
    good.get_function("coordinates")(grid, block, (out,))
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(d) for d in (grid[2], grid[1], grid[0], block[2], block[1],
                                                                  block[0])), indexing="ij")
    expected = np.stack([bx, by, bz, tx, ty, tz], axis=-1).reshape(12, 24, 6)
    np.testing.assert_array_equal(out, expected)


# ---- deliberate bugs ---------------------------------------------------------------------------

def test_missing_second_syncthreads_gives_a_wrong_result(bad_modules):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((32, 64), dtype=np.float32)
    b = rng.standard_normal((64, 32), dtype=np.float32)
    wrong = [order for order, module in bad_modules.items()
             if not np.allclose(run_matmul(module, "matmul_missing_second_sync", a, b), a @ b, atol=1e-4)]
    assert wrong, "the missing barrier went unnoticed in every order"


def test_early_return_before_a_barrier_is_a_divergent_barrier(bad):
    x = np.ones(300, np.float32)
    with pytest.raises(EmulatorError, match=r"early_return_before_barrier', block \(1, 0, 0\), thread \(\d+, 0, 0\)"
                                            r": divergent barrier"):
        bad.get_function("early_return_before_barrier")((2, 1, 1), (256, 1, 1), (x, poisoned(300), i32(300)))


def test_pre_volta_warp_synchronous_reduction_is_wrong_in_some_order(bad_modules):
    x = np.random.default_rng(6).random(4 * 64, dtype=np.float32)
    expected = x.reshape(4, 64).sum(1)
    wrong = []
    for order, module in bad_modules.items():
        out = poisoned(4)
        module.get_function("legacy_warp_reduce")((4, 1, 1), (64, 1, 1), (x, out))
        if not np.allclose(out, expected, rtol=1e-5):
            wrong.append(order)
    assert wrong, "implicit warp-synchronous code went unnoticed in every order"


def test_reading_shared_memory_nobody_wrote_gives_nan(bad):
    x = np.arange(64, dtype=np.float32)
    y = poisoned(64)
    bad.get_function("read_unwritten_shared")((1, 1, 1), (64, 1, 1), (x, y))
    assert np.isnan(y[63])
    np.testing.assert_array_equal(y[:63], x[:63] + x[1:])


@pytest.mark.parametrize("shared_mem", [128, 0])  # 0: the reads are past the launch's size, NaN too
def test_reading_dynamic_shared_memory_nobody_wrote_gives_nan(bad, shared_mem):
    y = np.zeros(32, np.float32)
    bad.get_function("read_unwritten_dynamic_shared")((2, 1, 1), (32, 1, 1), (y,), shared_mem=shared_mem)
    assert np.isnan(y).all()


def test_full_mask_shuffle_in_a_divergent_branch_is_an_error(bad):
    with pytest.raises(EmulatorError, match=r"divergent_full_shuffle'.*(has already exited|exited while lane)"):
        bad.get_function("divergent_full_shuffle")((1, 1, 1), (32, 1, 1), (np.ones(32, np.float32),
                                                                          poisoned(32)))


def test_shuffle_against_a_barrier_is_a_deadlock(bad):
    with pytest.raises(EmulatorError, match=r"shuffle_against_barrier'.*deadlock.*__syncthreads"):
        bad.get_function("shuffle_against_barrier")((1, 1, 1), (32, 1, 1), (np.ones(32, np.float32),
                                                                           poisoned(32)))


def test_mask_that_excludes_the_calling_lane_is_an_error(bad):
    with pytest.raises(EmulatorError, match=r"mask_excludes_caller'.*mask 0x00000001, which excludes its own lane"):
        bad.get_function("mask_excludes_caller")((1, 1, 1), (32, 1, 1), (np.ones(32, np.float32), poisoned(32)))


def test_missing_barrier_race_shows_only_in_another_order(bad_modules):
    x = np.arange(1, 257, dtype=np.float32)
    expected = np.concatenate([x[:1], x[:-1]])
    results = {}
    for order, module in bad_modules.items():
        y = poisoned(256)
        module.get_function("neighbour_race")((1, 1, 1), (256, 1, 1), (x, y))
        results[order] = y
    np.testing.assert_array_equal(results["forward"], expected)  # forward order hides the race ...
    assert np.isnan(results["reverse"][1:]).all()                # ... reverse order exposes every read
    assert not np.array_equal(results["random"], expected)


def test_module_keeps_working_after_a_kernel_error(bad, good):
    x = np.ones(4096, np.float32)
    with pytest.raises(EmulatorError, match="divergent barrier"):
        bad.get_function("early_return_before_barrier")((16, 1, 1), (256, 1, 1), (x, poisoned(4096), i32(4000)))
    y = poisoned(64)
    bad.get_function("read_unwritten_shared")((1, 1, 1), (64, 1, 1), (x[:64].copy(), y))
    np.testing.assert_array_equal(y[:63], 2.0)
    c = poisoned(4096)
    good.get_function("vector_add")((16, 1, 1), (256, 1, 1), (x, x, c, i32(4096)))
    np.testing.assert_array_equal(c, 2.0)


def test_launches_from_several_python_threads_and_after_fork():
    module = EmulatedModule(KERNELS / "good.cu", order="random", seed=3)
    kernel = module.get_function("vector_add")
    a = np.arange(4096, dtype=np.float32)

    def add(results, i):
        c = poisoned(4096)
        kernel((16, 1, 1), (256, 1, 1), (a, a, c, i32(4096)))
        results[i] = c

    results = [None] * 4
    threads = [threading.Thread(target=add, args=(results, i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for c in results:
        np.testing.assert_array_equal(c, 2 * a)

    # The block pool's threads do not survive fork(); the child must start its own, not hang.
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        c = poisoned(4096)
        kernel((16, 1, 1), (256, 1, 1), (a, a, c, i32(4096)))
        os._exit(0 if np.array_equal(c, 2 * a) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- argument checks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vector_add():
    return EmulatedModule(KERNELS / "good.cu").get_function("vector_add")


def test_python_int_scalar_is_refused(vector_add):
    a = np.ones(8, np.float32)
    with pytest.raises(TypeError, match=r"argument 3 \(n: i32\) must be a numpy.int32 scalar, not Python int"):
        vector_add((1, 1, 1), (8, 1, 1), (a, a, a.copy(), 8))


def test_scalar_of_another_numpy_type_is_refused(vector_add):
    a = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="numpy.int32 scalar, not int64"):
        vector_add((1, 1, 1), (8, 1, 1), (a, a, a.copy(), np.int64(8)))


def test_float64_array_is_refused(vector_add):
    a = np.ones(8, np.float32)
    with pytest.raises(TypeError, match=r"argument 0 \(a: const f32\*\) must be an array of float32, not float64"):
        vector_add((1, 1, 1), (8, 1, 1), (a.astype(np.float64), a, a.copy(), i32(8)))


def test_non_contiguous_array_is_refused(vector_add):
    a = np.ones(16, np.float32)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        vector_add((1, 1, 1), (8, 1, 1), (a[::2], a[:8], a[:8].copy(), i32(8)))


def test_read_only_output_is_refused(vector_add):
    a = np.ones(8, np.float32)
    out = a.copy()
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        vector_add((1, 1, 1), (8, 1, 1), (a, a, out, i32(8)))


def test_wrong_argument_count_is_refused(vector_add):
    a = np.ones(8, np.float32)
    with pytest.raises(TypeError, match=r"vector_add takes 4 arguments \(const f32\*,const f32\*,f32\*,i32\), got 3"):
        vector_add((1, 1, 1), (8, 1, 1), (a, a, a.copy()))


@pytest.mark.parametrize("grid, block, message", [
    ((1, 1, 1), (1025, 1, 1), "from 1 to 1024"),
    ((1, 1, 1), (32, 32, 2), "2048 threads; at most 1024"),
    ((1, 1, 1), (8, 0, 1), "block dimension y is 0"),
    ((0, 1, 1), (8, 1, 1), "grid dimension x is 0"),
])
def test_bad_launch_shape_is_refused(vector_add, grid, block, message):
    a = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=message):
        vector_add(grid, block, (a, a, a.copy(), i32(8)))


def test_too_much_dynamic_shared_memory_is_refused(good):
    x = np.ones(32, np.float32)
    kernel = good.get_function("reverse_chunks")
    with pytest.raises(SharedMemoryError, match="48 KiB") as info:
        kernel((1, 1, 1), (32, 1, 1), (x, poisoned(32), i32(32)), shared_mem=48 * 1024 + 4)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EmulatorError)
    kernel((1, 1, 1), (32, 1, 1), (x, poisoned(32), i32(32)), shared_mem=48 * 1024)  # the limit itself is fine


def test_unknown_kernel_and_order_are_refused():
    with pytest.raises(ValueError, match="has no kernel 'nope'; it has vector_add, matmul_tiled"):
        EmulatedModule(KERNELS / "good.cu").get_function("nope")
    with pytest.raises(ValueError, match="order must be one of forward, reverse, random"):
        EmulatedModule(KERNELS / "good.cu", order="backward")


# ---- runtime contract --------------------------------------------------------------------------

def test_runtime_contract():
    runtime = EmulatorRuntime(order="reverse", seed=1, kernels_dir=KERNELS)
    assert runtime.xp is np
    kernel = runtime.function("good.cu", "vector_add")
    assert runtime.function("good.cu", "vector_add") is kernel
    assert runtime.module("good.cu").order == "reverse"
    floats = runtime.empty((2, 3), np.float32)
    assert floats.dtype == np.float32 and np.isnan(floats).all()
    ints = runtime.empty((4,), np.int32)
    assert (ints == 0x7FFFFFFF).all()
    zeros = runtime.zeros((3,), np.float32)
    assert zeros.dtype == np.float32 and not zeros.any()
    with pytest.raises(TypeError, match="float, integer or bool"):
        runtime.empty((2,), np.complex64)


def test_unwritten_output_elements_stay_poisoned():
    runtime = EmulatorRuntime(kernels_dir=KERNELS)
    a = np.ones(100, np.float32)
    c = runtime.empty(100, np.float32)
    runtime.function("good.cu", "vector_add")((1, 1, 1), (64, 1, 1), (a, a, c, i32(60)))
    np.testing.assert_array_equal(c[:60], 2.0)
    assert np.isnan(c[60:]).all()


# ---- parsing and building ----------------------------------------------------------------------

def test_parse_source_reads_signatures_shared_and_constants():
    info = parse_source((KERNELS / "good.cu").read_text())
    specs = {k.name: k.signature for k in info.kernels}
    assert specs["vector_add"] == "const f32*,const f32*,f32*,i32"
    assert specs["atomics"] == "const i32*,const f32*,i32*,f32*,i32*,i32"
    assert specs["warp_ops"] == "const i32*,u32*,i32*,i32*,i32*,i32*,i32*"
    assert info.extern_shared == ("float", "chunk")
    assert [(c.name, c.shape) for c in info.constants] == [("poly_coeffs", (4,))]


@pytest.mark.parametrize("source, message", [
    ('__global__ void k(float* x) {}', 'extern "C" __global__'),
    ('extern "C" __global__ void k(float** x) {}', "pointer to a pointer"),
    ('extern "C" __global__ void k(half* x) {}', "type 'half'"),
    ('extern "C" __global__ void k(float2 v) {}', "vector types through pointers"),
    ('extern "C" __global__ void k() { extern __shared__ float a[]; extern __shared__ int b[]; }',
     "more than one extern __shared__"),
])
def test_parse_source_refuses_what_it_cannot_launch(source, message):
    with pytest.raises(EmulatorBuildError, match=message):
        parse_source(source)


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """An empty build cache shared by the build tests (the runtime object is compiled into it once)."""
    return tmp_path_factory.mktemp("emulator-cache")


def test_build_is_cached_by_content(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv(emu.CACHE_ENV, str(fresh_cache))
    calls = []
    real_compiler = emu._run_compiler
    monkeypatch.setattr(emu, "_run_compiler", lambda command, what: (calls.append(what), real_compiler(command, what)))
    source = tmp_path / "tiny.cu"
    source.write_text('extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }\n')

    first = EmulatedModule(source)
    assert calls[-1] == str(source) and calls.count(str(source)) == 1
    library = first.library_path
    assert library.parent == fresh_cache
    stamp = library.stat().st_mtime_ns

    calls.clear()
    second = EmulatedModule(source)  # a new module object: the cached library is reused, nothing compiled
    assert calls == [] and second.library_path == library
    assert library.stat().st_mtime_ns >= stamp
    y = np.zeros(4, np.float32)
    second.get_function("fill")((1, 1, 1), (4, 1, 1), (y, np.float32(2.5)))
    np.testing.assert_array_equal(y, 2.5)

    source.write_text(source.read_text().replace("= v;", "= 2.0f * v;"))
    third = EmulatedModule(source)  # new content, new build (the runtime object is still reused)
    assert calls == [str(source)] and third.library_path != library
    third.get_function("fill")((1, 1, 1), (4, 1, 1), (y, np.float32(2.5)))
    np.testing.assert_array_equal(y, 5.0)
    assert not list(fresh_cache.glob("*.tmp"))


def test_compile_errors_name_the_file(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv(emu.CACHE_ENV, str(fresh_cache))
    source = tmp_path / "uses_std.cu"
    # NVRTC has no std::min without headers; the emulator's header deliberately has none either.
    source.write_text('extern "C" __global__ void k(float* y) { y[0] = std::min(y[0], 1.0f); }\n')
    with pytest.raises(EmulatorBuildError, match=r"(?s)compiling .*uses_std\.cu for the emulator failed.*'std'"):
        EmulatedModule(source)
    assert not list(fresh_cache.glob("*.tmp"))
