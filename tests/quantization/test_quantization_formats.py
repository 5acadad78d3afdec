import warnings

import pytest
import torch

from lightning_peft.quantization import FORMATS, dequantize, formats, quantize

# Round-to-nearest error of one element, relative to its group's absmax (int8) or to the element itself plus a
# floor for subnormals (FP8: half a unit in the last place, with 3 / 2 mantissa bits).
_FP8_REL = {"fp8_e4m3": 2.0**-4, "fp8_e5m2": 2.0**-3}
_FP8_SUBNORMAL_SPACING = {"fp8_e4m3": 2.0**-9, "fp8_e5m2": 2.0**-16}
_FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


def _groups(x, group_size):
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, group_size)


def _error_bound(x, format, group_size, stochastic):
    """Per-element bound on |dequantize(quantize(x)) - x|, in float32, shaped like x."""
    groups = _groups(x, group_size)
    absmax = groups.abs().amax(dim=1, keepdim=True)
    if format == "int8":
        step = absmax / 127
        bound = step * (1.0 if stochastic else 0.5)
    else:
        scale = absmax / _FP8_MAX[format]
        factor = 2.0 if stochastic else 1.0
        bound = factor * (_FP8_REL[format] * groups.abs() + _FP8_SUBNORMAL_SPACING[format] / 2 * scale)
    # the dequantization itself rounds to the tensor's dtype
    bound = bound + groups.abs() * torch.finfo(x.dtype).eps
    return bound.reshape(-1)[: x.numel()].view(x.shape) * 1.001 + 1e-12


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_within_the_format_bound(format, stochastic, dtype):
    torch.manual_seed(0)
    # rows with very different magnitudes: per-group scales must keep the small ones accurate
    x = (torch.randn(6, 256) * torch.logspace(-3, 2, 6).unsqueeze(1)).to(dtype)
    q = quantize(x, format, group_size=128, stochastic_rounding=stochastic)
    restored = dequantize(q)
    assert restored.shape == x.shape and restored.dtype == x.dtype
    error = (restored.float() - x.float()).abs()
    assert (error <= _error_bound(x, format, 128, stochastic)).all()
    # and the error is not trivially zero: the data really went through 8 bits
    assert error.max() > 0
    assert q.data.element_size() == 1


@pytest.mark.parametrize("format", FORMATS)
def test_groups_run_along_the_last_dimension(format):
    x = torch.randn(4, 3, 256)
    q = quantize(x, format, group_size=64)
    assert q.scale.shape == (4 * 3 * 256 // 64,)
    # group k of row r is x[r, 64k:64k+64]: its scale is that slice's absmax over the format's maximum
    maximum = 127.0 if format == "int8" else _FP8_MAX[format]
    expected = x.reshape(-1, 256).view(-1, 4, 64).abs().amax(-1).reshape(-1) / maximum
    torch.testing.assert_close(q.scale, expected)


@pytest.mark.parametrize("format", FORMATS)
def test_sizes_that_are_not_a_multiple_of_the_group_and_zeros(format):
    x = torch.randn(3, 7, 5)
    x[1] = 0.0
    q = quantize(x, format, group_size=16)
    restored = dequantize(q)
    assert restored.shape == x.shape
    assert torch.isfinite(restored).all()
    assert (restored[1] == 0).all()
    assert (restored - x).abs().max() <= x.abs().max() * 0.07


@pytest.mark.parametrize("format", FORMATS)
def test_chunked_quantization_equals_one_chunk(format):
    x = torch.randn(1000, 48)
    whole = quantize(x, format, group_size=32)
    chunked = quantize(x, format, group_size=32, chunk_numel=100)
    assert torch.equal(whole.data.view(torch.uint8), chunked.data.view(torch.uint8))
    assert torch.equal(whole.scale, chunked.scale)


@pytest.mark.parametrize("format", FORMATS)
def test_stochastic_rounding_is_unbiased(format):
    # every group: one 1.0 that sets the scale, then a constant that lies between two grid points, where
    # round-to-nearest is biased and stochastic rounding is not
    x = torch.full((2000, 128), 0.3)
    x[:, 0] = 1.0
    generator = torch.Generator().manual_seed(0)
    nearest = dequantize(quantize(x, format, group_size=128))[:, 1:]
    stochastic = dequantize(quantize(x, format, group_size=128, stochastic_rounding=True, generator=generator))[:, 1:]
    assert (nearest - 0.3).abs().mean() > 1e-4
    assert (stochastic.mean() - 0.3).abs() < 1e-4
    assert len(stochastic.unique()) == 2


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`format` must be one of 'int8', 'fp8_e4m3', 'fp8_e5m2', got 'int4'.*HINT"):
        quantize(torch.randn(4), "int4")
    with pytest.raises(ValueError, match=r"`group_size` must be a positive integer, got 0.*HINT"):
        quantize(torch.randn(4), "int8", group_size=0)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.arange(4), "int8")


def test_nbytes_is_about_half_of_bf16():
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    q = quantize(x, "int8", group_size=128)
    assert q.nbytes / (x.numel() * x.element_size()) == pytest.approx(0.5 + 4 / (2 * 128))


@pytest.mark.slow
def test_compiled_kernels_match_eager(monkeypatch):
    # torch.compile needs a C++ compiler on CPU; the first call compiles (tens of seconds)
    monkeypatch.setattr(formats, "COMPILE_MIN_NUMEL", 0)
    torch.manual_seed(0)
    x = torch.randn(64, 256, dtype=torch.bfloat16) * torch.logspace(-2, 1, 256).to(torch.bfloat16)
    eager = quantize(x, "int8", group_size=128)
    compiled = quantize(x, "int8", group_size=128, compile=True)
    torch.testing.assert_close(compiled.scale, eager.scale)
    # the same integers, up to a rare tie broken the other way by a differently ordered division
    assert (compiled.data.int() - eager.data.int()).abs().max() <= 1
    assert (compiled.data != eager.data).float().mean() < 1e-3
    restored = dequantize(compiled, compile=True)
    assert restored.dtype == x.dtype and restored.shape == x.shape
    assert ((restored.float() - x.float()).abs() <= _error_bound(x, "int8", 128, False) + 1e-2 * x.float().abs()).all()
    # sizes that are not a multiple of the group fall back to the eager path
    odd = torch.randn(7, 5)
    torch.testing.assert_close(dequantize(quantize(odd, compile=True), compile=True), dequantize(quantize(odd)))


def test_compile_defaults_to_cuda_tensors_only_and_serves_large_tensors(monkeypatch):
    calls = []

    def recording(function):
        calls.append(function.__name__)
        return function

    monkeypatch.setattr(formats, "_compiled", recording)
    monkeypatch.setattr(formats, "COMPILE_MIN_NUMEL", 1024)
    x = torch.randn(4, 256)
    dequantize(quantize(x))  # CPU tensor, compile=None: eager
    assert calls == []
    dequantize(quantize(x[:2], compile=True), compile=True)  # under COMPILE_MIN_NUMEL: the eager kernels
    assert calls == []
    dequantize(quantize(x, compile=True), compile=True)
    assert calls == ["_quantize_int8_groups", "_dequantize_int8_groups"]


def test_compile_min_numel_is_above_small_activations():
    # a torch.compile call costs tens of microseconds of host time: small tensors must not pay it
    assert formats.COMPILE_MIN_NUMEL >= 1 << 16


def test_a_failing_compiler_falls_back_to_eager_once_with_a_warning(monkeypatch):
    def broken(function):
        def run(*args):
            raise RuntimeError("Cannot find a working triton installation")

        return run

    monkeypatch.setattr(formats, "_compiled", broken)
    monkeypatch.setattr(formats, "_FAILED", set())
    monkeypatch.setattr(formats, "COMPILE_MIN_NUMEL", 0)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"torch.compile of the 8-bit _quantize_int8_groups kernel failed.*triton"):
        fallback = quantize(x, compile=True)
    eager = quantize(x, compile=False)
    assert torch.equal(fallback.data, eager.data) and torch.equal(fallback.scale, eager.scale)
    with pytest.warns(UserWarning, match="_dequantize_int8_groups"):
        restored = dequantize(fallback, compile=True)
    assert torch.equal(restored, dequantize(eager, compile=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls go straight to eager
        quantize(x, compile=True)
        dequantize(fallback, compile=True)
