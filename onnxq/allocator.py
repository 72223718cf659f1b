"""Keep freed memory for reuse instead of handing it back to the kernel (glibc), in onnxq's own processes.

Quantization allocates and frees the same large temporaries batch after batch (captured activations, unfolded
columns, a pass's work arrays), and every page the kernel hands out afresh is zeroed on first touch:
EfficientNet-Lite0's default run took 760-940k page faults and 3.5-5.6 s of system time without this, ~500k and 2-4 s
with it; MiniLM's rounding workers ~1 CPU s of 11-13. The CLI and the rounding workers call it; a library must not
change its host's allocator, so the Python API leaves it to the caller (``GLIBC_TUNABLES`` does the same from the
environment).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 256 << 20  # arrays up to this size come from the heap, so their pages are reused


def keep_freed_memory() -> bool:
    """Serve arrays up to ``KEEP_FREED_BYTES`` from the heap, and hand freed heap memory back only past 4x that;
    whether glibc took the settings (False elsewhere: nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, KEEP_FREED_BYTES), (M_TRIM_THRESHOLD, 4 * KEEP_FREED_BYTES),
                (M_TOP_PAD, KEEP_FREED_BYTES))
    return all([mallopt(option, value) == 1 for option, value in settings])
