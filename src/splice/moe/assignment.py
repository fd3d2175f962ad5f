"""Maximum-weight perfect matching of two sets of units (the linear assignment problem).

Uses SciPy's ``linear_sum_assignment`` when SciPy is installed, else a
Hungarian-algorithm implementation (shortest augmenting paths with potentials,
O(n^3), the inner scan vectorised with NumPy).
"""

from __future__ import annotations

import numpy as np


def _hungarian_min(cost: np.ndarray) -> np.ndarray:
    """Column assigned to each row, minimising the total cost of a square matrix."""
    n = cost.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j]: row (1-based) matched to column j; column 0 is virtual
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.empty(n, dtype=np.int64)
    cols[p[1:] - 1] = np.arange(n)
    return cols


def max_weight_matching(score: np.ndarray) -> np.ndarray:
    """``perm`` with ``perm[i]`` the column matched to row ``i``, maximising ``sum score[i, perm[i]]``."""
    score = np.asarray(score, dtype=np.float64)
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise ValueError("score must be a square matrix")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return _hungarian_min(-score)
    rows, cols = linear_sum_assignment(score, maximize=True)
    perm = np.empty(score.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm
