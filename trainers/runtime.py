"""Process settings for CPU training: keep freed memory in the C heap instead of returning it to the kernel.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large requests (from 128 KiB, rising to
at most 32 MiB) with a fresh ``mmap`` and unmaps them on free, and trims the top of the heap when more than a few
MiB are free. A training step allocates and frees the same large tensors every step (activations, logits,
gradients), so by default the kernel maps and zero-fills them again every step: measured here, 68,000 page
faults and 0.13 s of system time per forward+backward of the SimCLR loss at N = 4096 (20 % on top of the
arithmetic), and 3,100 faults (about 20 %) at N = 1024. The fix the PyTorch CPU performance guides give is
another allocator (jemalloc or tcmalloc via ``LD_PRELOAD``); :func:`keep_freed_memory` gets the same effect from
glibc itself, at run time: no ``mmap`` for large blocks and no trimming, so freed blocks are reused.

The cost: the process keeps its peak memory until it exits (as PyTorch's CUDA caching allocator does on GPUs).
Set ``CONTRASTIVE_STUDY_MALLOC=system`` to leave the C library's defaults alone. Other C libraries (musl, macOS)
are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "CONTRASTIVE_STUDY_MALLOC"
# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest one (2 GiB of free heap top before trimming)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (once per process); ``True`` if it is now in effect.

    A no-op returning ``False`` when ``CONTRASTIVE_STUDY_MALLOC=system`` is set, or when the C library is not glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_VAR, "").strip().lower() == "system":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Large blocks then come from the heap, and the heap is never trimmed.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied
