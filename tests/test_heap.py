"""A node job keeps the memory a training step frees for the next (node_payload.common.heap)."""

import subprocess
import sys

import pytest

# A 4 MiB block written, freed, then allocated and written again: the faults of the second write.
SECOND_WRITE_FAULTS = """
import ctypes, resource, sys
from node_payload.common.heap import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 4 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(ctypes.c_void_p(block))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_write_faults(mode: str) -> int:
    command = [sys.executable, "-c", SECOND_WRITE_FAULTS, mode]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_without_page_faults() -> None:
    pages = (4 << 20) // 4096
    assert second_write_faults("default") > pages // 2  # glibc gives the block back
    assert second_write_faults("kept") < pages // 10
