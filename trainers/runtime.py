"""Process settings for CPU training: keep freed memory in the C heap instead of returning it to the kernel.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large requests (from 128 KiB, rising to
at most 32 MiB) with a fresh ``mmap`` and unmaps them on free, and trims the top of the heap when more than a few
MiB are free. A training step allocates and frees the same large tensors every step (activations, logits,
gradients), so by default the kernel maps and zero-fills them again every step: measured here, 68,000 page
faults and 0.13 s of system time per forward+backward of the SimCLR loss at N = 4096 (20 % on top of the
arithmetic), and 3,100 faults (about 20 %) at N = 1024. The fix the PyTorch CPU performance guides give is
another allocator (jemalloc or tcmalloc via ``LD_PRELOAD``); :func:`keep_freed_memory` gets the same effect from
glibc itself, at run time: no ``mmap`` for large blocks and no trimming, so freed blocks are reused.

The cost: the process keeps its peak memory (as PyTorch's CUDA caching allocator does on GPUs) until
:func:`release_freed_memory` hands the free pages back; a process that runs one trial after another (Tune reuses
trial processes) calls it before each trial, so one trial's freed memory is not carried into the next.
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


def _glibc_function(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library) if library else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: not glibc's malloc
        return None
    return getattr(libc, name, None)


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
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Large blocks then come from the heap, and the heap is never trimmed.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return _applied


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim(0)``); a no-op elsewhere."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        trim(0)
