"""Keep freed heap memory for the next large buffer instead of giving it back at once.

glibc returns a freed block above its mmap threshold to the kernel, and trims the heap's
top once more than its trim threshold lies free there. A process whose every request
builds and frees buffers of megabytes (a meter-day of history is 5-7 MB, held two or
three times over on its way to the socket) then has each new buffer's pages faulted in
and zeroed by the kernel again: 3,500-7,400 minor faults per meter-day read in the API,
measured (docs/api.md, "Memory the API keeps"). Raising both thresholds keeps up to
`keep_bytes` of freed memory in the process for reuse; the process's resident size stays
at its busiest so far instead of falling back between requests.
"""

from __future__ import annotations

import ctypes
from typing import Final

#: mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
#: glibc refuses an mmap threshold above this (HEAP_MAX_SIZE / 2 on 64-bit): larger blocks
#: are still mapped and unmapped each time.
_MMAP_THRESHOLD_MAX: Final = 32 * 1024 * 1024
#: mallopt takes a C int: a larger value would wrap (4 GiB to 0, a trim on every free).
_INT_MAX: Final = 2**31 - 1


def keep_freed_memory(keep_bytes: int) -> bool:
    """Blocks up to 32 MiB come from the heap, and up to `keep_bytes` (at most 2 GiB - 1,
    what mallopt can take) of free heap top is kept. False where the C library has no
    `mallopt` (not glibc) or refused a value: the process runs as before."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        and mallopt(_M_TRIM_THRESHOLD, min(keep_bytes, _INT_MAX))
    )
