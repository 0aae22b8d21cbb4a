"""Large freed buffers kept for reuse, on Linux with glibc: fewer fresh pages per forward pass.

glibc's malloc serves a large request (past a threshold it raises up to 32 MiB as it sees
large blocks freed) with a fresh anonymous mapping, and unmaps it when the block is freed. A
forward pass of 1,024 tokens writes its logits, 103 MB in bfloat16 and 206 MB in float32, into
such a mapping every call, and the kernel zeroes and maps each of its 4 KiB pages as they are
first written: page faults, which the next call pays again. `keep_freed_memory()` tells malloc
to serve large requests from its heap and to keep freed memory there (mallopt's
M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), so a buffer freed by one call is reused by the next
(from the second or third call on: a freed block hemmed in by a small live one does not fit an
aligned request of its own size, which then takes fresh heap once).

It is a setting of the whole process, for every allocation from then on, not of a model, and
the memory it keeps is not given back to the system while the process lives: nothing here runs
unless asked (`gpt2-decl bench --keep-freed-memory`, or a call of `keep_freed_memory()`).
"""

import ctypes
import ctypes.util
import functools

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Requests up to this size come from the heap: all of a forward pass's buffers.
HEAP_UP_TO_BYTES = 2**30
# Free memory at the heap's top kept rather than given back, up to this much.
KEEP_BYTES = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have malloc serve large requests from its heap and keep what is freed there, for the
    rest of the process; whether it could (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
