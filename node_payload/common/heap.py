"""The C heap of a short job that trains: freed memory kept for the next step, not returned.

glibc gives each large block (128 KiB at first) its own mmap and returns the heap's free top to
the system; a training step frees and reallocates its activations and gradients, so the next
step page-faults them in again, zeroed by the kernel. A node job's process lives for one job, so
keeping freed memory holds nothing it would not use again, and its steps take far fewer page
faults and less CPU time (benchmarks/bench_train_step.py). Not for long-lived processes (predict
on a slide, the dagtrain command), whose peak memory it would raise.
"""

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks of 32 MiB or more still get an mmap
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> None:
    """Set glibc's thresholds; where the C library is not glibc, nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
