"""Time the one-off numba compile of splice's TIES kernels (what the first merge after install pays).

python benchmarks/kernel_compile.py        # clears the kernels' on-disk cache first
"""

import glob
import os
import time

import torch

import splice.methods._kernels as K
from splice.methods.task_arithmetic import merge_task_vectors

for f in glob.glob(os.path.join(os.path.dirname(K.__file__), "__pycache__", "_kernels*.nb[ic]")):
    os.remove(f)
n = 1 << 19  # above SORT_LIMIT: the kernel path
base = torch.randn(n).bfloat16()
fts = [(base.float() + 0.01 * torch.randn(n)).bfloat16() for _ in range(3)]
for label in ("first call (compile + run)", "second call (run)"):
    t = time.perf_counter()
    merge_task_vectors(fts, base, weight=[1.0] * 3, trim_density=[0.5] * 3, consensus=True, normalize=True)
    print(f"{label}: {time.perf_counter() - t:.2f} s")
