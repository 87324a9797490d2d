"""Keep large freed blocks in the process heap during CPU training (glibc only).

glibc's malloc serves every request above its mmap threshold (at most 32 MiB once it has adjusted itself) with a
fresh mmap and returns it with munmap when freed. A training step frees and requests the same large buffers every
step: the dense gradient of the embedding (SmolLM2's is 113 MB), the loss's logits chunks, large activations. Each
fresh mapping is zero-filled by the kernel one 4 KiB page fault at a time, so the 113 MB gradient alone costs about
28,000 page faults a step (measured: SmolLM2-135M reward-model training on 2 cores, 4% of the step). Raising the
mmap and trim thresholds keeps those blocks in the heap for the next step instead. The peak resident memory does
not change (the blocks are in use at every step's peak anyway); memory freed after training stays with the process
until it exits.

This is what CPU training guides get from swapping in jemalloc or tcmalloc with LD_PRELOAD, done in-process for
the common case. `FORGELINE_MALLOC_TUNING=0` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 512 * 2**20  # blocks above this (rare in training) still get their own mapping
TRIM_THRESHOLD = 1 * 2**30


@functools.lru_cache(maxsize=None)
def keep_large_blocks() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True when they were set."""
    if os.environ.get("FORGELINE_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)
        return False
    return ok
