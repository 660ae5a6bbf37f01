"""Where tensors live and in which precision (device choice and bf16 autocast, shared by training,
evaluation and the benchmarks), and how the process keeps its memory (glibc's malloc, for training).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


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


def processor_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or what `platform` knows elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, object]:
    """What a run ran on, for its record: the device (a GPU by name), the CPU, its cores, whether it
    computes bf16 natively, and the torch and Python versions."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": f"{device.type}: {gpu}" if gpu else device.type,
        "processor": processor_name(),
        "cores": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "python": platform.python_version(),
    }


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


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the OS.

    By default glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so a training
    step's large activations are new pages each step, which the kernel faults in and zeroes one 4 KiB page
    at a time: on the recipe model at 32x32 that was a fifth of our step and two thirds of the plain
    reference's (an fp32 add of two activations 13.5 ms instead of 3.3). Process-wide and one-way: the
    memory stays with the process (its peak stays its footprint). Does nothing where malloc is not glibc's.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc found, or one without mallopt (musl)
        return
    mallopt(_M_MMAP_MAX, 0)  # every block from the heap, none mmapped on its own
    mallopt(_M_TRIM_THRESHOLD, -1)  # and the heap's free top never trimmed (-1: mallopt(3)'s "disable")
