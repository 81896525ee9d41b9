"""What CPU a benchmark ran on: its model name, core count and the instruction-set flags that change the figures
(AVX2 / AVX-512 kernels, bf16 matmul units). Benchmarks print it and derive their sentences from it."""

from __future__ import annotations

import os

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count() or 1, **{flag: flag in flags for flag in FLAGS}}
