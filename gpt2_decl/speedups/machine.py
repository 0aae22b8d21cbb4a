"""What a speed-up plan was measured on: the CPU's model and the instruction sets that decide
which way of computing wins, and the number of threads."""

import functools
import platform
from pathlib import Path

import torch

# The CPU features whose presence changes which way wins: vector width (AVX2, AVX-512), integer
# dot products (VNNI), bfloat16 arithmetic (AVX512-BF16, AMX).
DECIDING_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                     "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The deciding features this CPU has (Linux flags; elsewhere torch's own reading)."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            flags = set(line.partition(":")[2].split())
            return [feature for feature in DECIDING_FEATURES if feature in flags]
    return [torch.backends.cpu.get_cpu_capability().lower()]


def this_machine() -> dict:
    """What a plan records of the machine it was measured on, and checks before it is used."""
    return {"cpu": cpu_model(), "architecture": platform.machine(), "features": cpu_features(),
            "threads": torch.get_num_threads()}


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    """/proc/cpuinfo's lines, read once a process (a plan is checked before every decoding
    step); none where there is no such file."""
    try:
        return tuple(CPUINFO.read_text().splitlines())
    except OSError:
        return ()
