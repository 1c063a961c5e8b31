"""Keep freed CPU memory for reuse, so CPU inference does not pay the kernel for every activation.

A 512x512 CT batch of four through the small CPU network allocates activations of 32-128 MB per layer. glibc
serves blocks that large with ``mmap`` and gives them back with ``munmap`` when PyTorch frees them, so every
layer of every batch faults its pages in again: about 25,000 page faults per slice, a third of the CPU time
in the kernel on this project's 2-core test machine. Worse, a worker thread's allocations come from a
per-thread arena whose heaps are capped at 64 MB, so raising the mmap threshold alone does not help the
thread that runs the model.

:func:`keep_freed_memory` therefore (1) puts every thread on glibc's main arena (one arena, grown with
``brk`` without a size cap), (2) serves blocks up to 1 GiB from that heap instead of ``mmap``, and (3) stops
glibc from trimming the heap. Measured with ``bench/pipeline.py`` (300 slices, ``ct-cnn-small``, 2-core VM,
the same settings given as ``MALLOC_ARENA_MAX``/``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` before this
module existed): the network alone went from 53.8 s to 34.4 s and the whole pipeline from 60.2 s to 45.0 s.
The price is that the process keeps its peak heap (about 0.65 GB instead of 0.53 GB for that batch), which is
why it is a setting (``models.keep_freed_cpu_memory``). GPU inference does not need it (CUDA has its own caching
allocator), but it costs little there either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

LOGGER = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks up to this size come from the heap instead of their own mapping.
MMAP_THRESHOLD_BYTES = 1 << 30
#: The heap is never trimmed below its peak (the largest value mallopt accepts as a positive int).
TRIM_THRESHOLD_BYTES = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Tune glibc's allocator so freed large blocks are reused instead of returned to the kernel.

    Call it once at start-up, before the threads that run models are started: a thread keeps the arena it
    first allocated from. Returns ``False`` (and changes nothing) where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
    except (OSError, AttributeError) as exc:
        LOGGER.warning("cannot tune the C allocator (%s); CPU inference will be slower", exc)
        return False
    if not ok:
        LOGGER.warning("glibc refused an allocator setting; CPU inference may be slower")
    return ok
