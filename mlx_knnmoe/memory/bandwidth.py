"""The RBF bandwidth of a layer, calibrated from its keys (framework-free NumPy)."""

from __future__ import annotations

import numpy as np


def calibrate_bandwidth(keys: np.ndarray, sample: int = 1024, seed: int = 0) -> float:
    """RBF bandwidth tau: median squared distance from a key to its nearest distinct key.

    Keys closer than 1e-4 of the median squared key norm count as duplicates (the same prefix
    in another example; the expanded distance formula leaves rounding noise of about 1e-6 of
    the norm there), so templated data with many repeated prefixes does not give tau ~ 0.
    """
    k = np.asarray(keys, dtype=np.float32)
    if len(k) < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(k), size=min(sample, len(k)), replace=False)
    q = k[rows]
    sq = (k * k).sum(1)
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ k.T + sq[None, :]
    d2[np.arange(len(rows)), rows] = np.inf
    d2[d2 <= 1e-4 * np.median(sq)] = np.inf
    nearest = d2.min(1)
    distinct = nearest[np.isfinite(nearest)]
    return float(np.median(distinct)) if len(distinct) else 1.0
