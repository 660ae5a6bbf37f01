"""Where tensors live and in which precision: device choice and bf16 autocast, shared by training,
evaluation and the benchmarks.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA, then MPS, then CPU. Under DDP each process takes the GPU of its local rank."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps asked for, but MPS is not available")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def cpu_has_native_bf16() -> bool:
    # Private helpers, hence getattr: without AVX512-BF16 or AMX, bf16 is emulated and the attention
    # backward runs 5x slower than fp32 (measured on the 2-core AMD EPYC this project is sized on).
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
