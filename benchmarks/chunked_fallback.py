"""A/B: the torch-chunked TIES path (numba absent) against the whole-tensor torch path.

python benchmarks/chunked_fallback.py [THREADS] [ROUNDS]     # defaults: 1 thread (the engine's default per job), 7 rounds

One 4096x4096 bfloat16 tensor, 3 models, density 0.5, normalize. The two paths
alternate within each round (which goes first alternates too), so load from other
processes hits both alike; the medians are compared. Both give the same bits.
"""

import statistics
import sys
import time

import torch

from splice.methods import _kernels
from splice.methods._sparsify import magnitude_
from splice.methods.task_arithmetic import merge_task_vectors

_kernels.AVAILABLE = False  # the fallback: no numba
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
n = 4096
base32 = torch.randn(n, n, generator=g) * 0.02
fts = [(base32 + 0.002 * torch.randn(n, n, generator=g)).bfloat16() for _ in range(3)]
base = base32.bfloat16()
del base32
kw = dict(weight=[1.0, 0.7, 0.5], consensus=True, normalize=True)
density = [0.5] * 3


def chunked():
    return merge_task_vectors(fts, base, trim_density=density, **kw)


def whole():  # a sparsify callback forces the whole-tensor path
    return merge_task_vectors(fts, base, sparsify=lambda i, d, s: magnitude_(d, density[i], False, scratch=s), **kw)


assert torch.equal(chunked(), whole())
times = {"chunked": [], "whole": []}
for r in range(rounds):
    order = (("chunked", chunked), ("whole", whole)) if r % 2 == 0 else (("whole", whole), ("chunked", chunked))
    for name, f in order:
        t = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(f"threads={threads} {name:8s} median {statistics.median(ts):.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
