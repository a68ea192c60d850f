"""utils/allocator.py: with glibc keeping freed memory, an array of a size not seen before reuses the
process's pages instead of faulting in new ones (each a kernel zero-fill), as activations do when
every batch has other valid lengths. Results never depend on it; where memory comes from does."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli_helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="mallopt is glibc's")

# 60 arrays of ~12 MB, each 16 KB larger than the last: a fresh mapping per array for glibc's
# default (its mmap threshold follows the largest block freed so far, a step behind).
SCRIPT = """
import resource, sys
import numpy as np
from utils.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
for n in range(60):
    np.ones(1_500_000 + 2048 * n)
print(applied, faults() - start)
"""


def run(apply: bool, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if apply else "0"], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True, env={**environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_for_new_sizes() -> None:
    applied, kept = run(True)
    _, default = run(False)
    assert applied
    assert default > 60 * 100, default   # ~500 faults per array here (transparent huge pages take some)
    assert kept < default / 10, (kept, default)


def test_a_malloc_tuned_by_the_environment_is_left_alone() -> None:
    applied, _ = run(True, MALLOC_ARENA_MAX="2")
    assert not applied
    applied, _ = run(True, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
    assert not applied
