"""node.engine.malloc: the inference worker's allocator keeps a study's freed blocks."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# In a child: the setting is process-wide and must not reach the test process. mallinfo2's hblks
# counts the blocks glibc has mmapped: a 16 MB block is one of them before, and not after.
CHILD = """
import ctypes
from node.engine.malloc import keep_freed_blocks

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
mapped = lambda: libc.mallinfo2().hblks
before = mapped(); block = bytearray(16 << 20); during = mapped(); del block
kept = keep_freed_blocks()
block = bytearray(16 << 20); after = mapped()
print(kept, during - before, after - before)
"""


def _child(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_after_it_a_16_mb_block_comes_from_the_heap_not_mmap() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _child(env) == ["True", "1", "0"]


def test_an_operators_setting_is_left_as_it_is() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
    assert _child(env) == ["False", "1", "1"]
