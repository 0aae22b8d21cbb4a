"""The C++ GEMV kernel: built wherever a compiler is found (a failure to build is a failure, not
a skip), products within float32's rounding of float64's, and a one-line reason where it cannot
be built."""

import os
import platform
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from gpt2_decl.speedups import gemv

pytestmark = pytest.mark.skipif(gemv.unavailable_reason() is not None,
                                reason=f"{gemv.unavailable_reason()}")


@pytest.fixture(scope="module")
def kernel():
    gemv.load()  # raises KernelUnavailable (a failure) if a compiler is there but cannot build


def float64_product(x, weight, bias=None):
    wide_bias = None if bias is None else bias.double()
    return F.linear(x.double(), weight.double(), wide_bias)


# One row and a few; K and N not multiples of the kernel's vectors and blocks.
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_are_within_float32_rounding_of_float64(kernel, rows, dtype):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1, 200, generator=generator).to(dtype)
    weight = torch.randn(77, 200, generator=generator).to(dtype)
    bias = torch.randn(77, generator=generator).to(dtype)
    ours = gemv.gemv_linear(x, weight, bias)
    assert ours.shape == (rows, 1, 77) and ours.dtype == dtype
    expected = float64_product(x, weight, bias)
    # Float32 sums of 200 products: well within 1e-4 relative; bfloat16 rounds the result.
    tolerance = 1e-4 if dtype == torch.float32 else 8e-3
    assert torch.allclose(ours.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rows", [1, 6])
def test_int8_rows_are_read_as_their_dequantized_values(kernel, tiny_model, rows):
    pytest.importorskip("torchao", reason="int8 weights come from torchao")
    from gpt2_decl.speedups.quantize import int8_rows, quantize

    layer = quantize(tiny_model).blocks[0].mlp.up
    qdata, scale, zero_point = int8_rows(layer.weight)
    dequantized = ((qdata.double() - zero_point.double().reshape(-1, 1))
                   * scale.double().reshape(-1, 1))
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(1))
    ours = gemv.gemv_linear(x, layer.weight, layer.bias)
    expected = F.linear(x.double(), dequantized, layer.bias.double())
    assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_within_the_mode_goes_through_the_kernel_and_gradients_do_not(
        kernel, tiny_config, dtype, monkeypatch):
    from gpt2_decl import GPT2

    model = GPT2(tiny_config).to(dtype).eval()
    tokens = torch.randint(tiny_config.vocab_size, (2, 7),
                           generator=torch.Generator().manual_seed(1))
    exact = GPT2(tiny_config).double().eval()(tokens)
    calls = []
    product = gemv.gemv_linear
    monkeypatch.setattr(gemv, "gemv_linear", lambda *args: calls.append(1) or product(*args))
    with torch.no_grad(), gemv.GemvLinear():
        ours = model(tokens).double()
    assert len(calls) == 9  # four products a block, two blocks, and the head
    with torch.no_grad():
        library = model(tokens).double()
    # Float32 sums, rounded once to the model's dtype, as the library's.
    assert (ours - exact).abs().max() <= 1.5 * (library - exact).abs().max() + 1e-5
    with gemv.GemvLinear():
        model(tokens).float().square().mean().backward()
    assert len(calls) == 9 and model.lm_head.weight.grad is not None  # the library's, with grad


def test_it_reads_float32_bfloat16_and_int8_weights_only():
    assert gemv.reads(torch.zeros(4, 4)) and gemv.reads(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert not gemv.reads(torch.zeros(4, 4, dtype=torch.float16))
    assert not gemv.reads(torch.zeros(4))


def test_no_compiler_is_one_line_saying_so(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    reason = gemv.unavailable_reason()
    assert reason == "no C++ compiler: $CXX='no-such-compiler' is not found"


def test_another_architecture_is_one_line_saying_so(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert gemv.unavailable_reason() == ("the GEMV kernel is written for x86-64; this machine "
                                         "is aarch64")


def test_a_failed_build_is_one_line_naming_the_compiler(monkeypatch, tmp_path):
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'fatal: this compiler refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gemv.load.cache_clear()
    try:
        with pytest.raises(gemv.KernelUnavailable, match=f"did not build with {fake}") as error:
            gemv.load()
        assert "\n" not in str(error.value)
    finally:
        gemv.load.cache_clear()


# The source compiles for each x86-64 level it meets (AVX2 only, AVX-512 without VNNI, AVX-512
# with VNNI, AMX), with each compiler here; compiling is all that is asked of another CPU's
# instructions.
MARCHES = ("x86-64-v3", "skylake-avx512", "icelake-server", "sapphirerapids")


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["g++", "clang++"])
@pytest.mark.parametrize("march", MARCHES)
def test_the_source_compiles_for_each_x86_level_with_each_compiler(compiler, march, tmp_path):
    found = shutil.which(compiler)
    if found is None:
        pytest.skip(f"{compiler} is not installed")
    from torch.utils.cpp_extension import include_paths

    includes = [flag for path in include_paths() for flag in ("-I", path)]
    openmp = [gemv.OPENMP] if gemv._has_openmp(found) else []
    done = subprocess.run([found, "-std=c++17", "-fsyntax-only", f"-march={march}", *openmp,
                           *includes, str(gemv.SOURCE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_the_kernel_builds_with_clang_where_it_is_installed(tmp_path):
    clang = shutil.which("clang++")
    if clang is None:
        pytest.skip("clang++ is not installed")
    # In a process of its own: one process holds one build of the kernel's ops.
    code = ("import torch; from gpt2_decl.speedups import gemv; gemv.load(); "
            "x = torch.randn(2, 64); w = torch.randn(8, 64); "
            "assert torch.allclose(gemv.gemv_linear(x, w), x @ w.T, atol=1e-4)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "CXX": clang, "XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]


def int8_weight(rows, columns, generator):
    qdata = torch.randint(-128, 128, (rows, columns), dtype=torch.int8, generator=generator)
    scale = torch.rand(rows, generator=generator) / 100
    zero_point = torch.randint(-3, 4, (rows,), dtype=torch.int8, generator=generator)
    return qdata, scale, zero_point


# How far off each element of x may be read, as a fraction of max|x| in its row: split into two
# int8 digits of at most L = 127 (VNNI), max|x| / (2 L * 2 L); rounded to int16 on a scale of
# max|x| / 32767 (AVX2), half that scale; widened, nothing. (One int8 digit alone would be off by
# 2 L times more than the digits' bound, which the bounds do not allow.)
ELEMENT_ERRORS = {"digits": 1 / (4 * 127**2), "int16": 1 / (2 * 32767), "widened": 0.0}


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("columns", [200, 768, 5000])
def test_int8_products_are_within_the_stated_error_of_the_rounded_rows(kernel, rows, columns):
    generator = torch.Generator().manual_seed(columns + rows)
    qdata, scale, zero_point = int8_weight(45, columns, generator)
    x = torch.randn(rows, columns, generator=generator) * 3
    ours = torch.ops.gpt2_decl.int8_gemv(x, qdata, scale, zero_point).double()
    dequantized = (qdata.double() - zero_point.double()[:, None]) * scale.double()[:, None]
    exact = float64_product(x, dequantized)
    fraction = ELEMENT_ERRORS[torch.ops.gpt2_decl.int8_gemv_way()]
    per_element = x.abs().amax(1, keepdim=True).double() * fraction
    rounding = 1e-5 * (x.double().abs() @ dequantized.abs().T) + 1e-6  # float32 sums
    bound = per_element * dequantized.abs().sum(1) + rounding
    assert ((ours - exact).abs() <= bound).all()


def test_the_largest_int8_products_of_long_rows_do_not_overflow(kernel):
    # Every weight -128 and every element the row's largest, over 10,000 columns: integer sums
    # far past what one int32 lane holds, and the product known by hand.
    x = torch.full((1, 10000), 3.0)
    qdata = torch.full((4, 10000), -128, dtype=torch.int8)
    ours = torch.ops.gpt2_decl.int8_gemv(x, qdata, torch.full((4,), 0.5),
                                         torch.zeros(4, dtype=torch.int8))
    assert torch.allclose(ours, torch.full((1, 4), -128 * 3.0 * 10000 * 0.5), rtol=1e-6, atol=0)


def test_a_nan_or_infinity_in_a_row_leaves_none_of_its_int8_products_finite(kernel):
    generator = torch.Generator().manual_seed(0)
    qdata, scale, zero_point = int8_weight(40, 96, generator)
    x = torch.randn(3, 96, generator=generator)
    x[0, 5], x[2, 90] = float("nan"), float("inf")
    ours = torch.ops.gpt2_decl.int8_gemv(x, qdata, scale, zero_point)
    assert ours[0].isnan().all() and not ours[2].isfinite().any()
    assert ours[1].isfinite().all()


def test_processes_that_load_it_at_once_build_it_once(tmp_path):
    library, builds = tmp_path / "gemv.so", []

    def build():
        builds.append(1)
        time.sleep(0.3)  # long enough for the other to look for the library meanwhile
        library.write_bytes(b"built")

    threads = [threading.Thread(target=gemv._build_once, args=(library, build)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and library.read_bytes() == b"built"
