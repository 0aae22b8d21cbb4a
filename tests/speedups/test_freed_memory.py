"""Large freed buffers kept for reuse: once a buffer's size has been allocated and freed a few
times, the next one of that size faults in no fresh pages where they are kept, and about one
per 4 KiB page where they are not. In a process of its own: the setting is the whole
process's, and is taken there after the default is measured."""

import subprocess
import sys

import pytest

# Page faults while writing a 64 MiB tensor after three were filled and freed, first as the
# process starts, then after keeping freed memory. Not after one: a freed block hemmed in by a
# small live one is a hole that an aligned request of its own size does not fit, so the second
# buffer may come from fresh heap; from the third on, it is reused.
FOURTH_BUFFER_FAULTS = """
import resource, torch
def faults():
    for _ in range(3):
        torch.ones(16 * 2**20)  # 64 MiB, filled and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
from gpt2_decl.speedups.freed_memory import keep_freed_memory
assert keep_freed_memory()
print(default, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_a_freed_large_buffer_is_reused_without_fresh_pages():
    done = subprocess.run([sys.executable, "-c", FOURTH_BUFFER_FAULTS],
                          capture_output=True, text=True, check=True)
    default, kept = map(int, done.stdout.split()[-2:])
    pages = 64 * 2**20 // 4096
    assert default > pages // 2  # mapped afresh
    assert kept < pages // 100
