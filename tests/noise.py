"""Float tolerances from a measured noise floor, not from one machine's run.

The noise floor of a float32 computation is how far its result lies from the same computation
in float64 (same inputs, same code): the rounding error float32 adds here, with this BLAS, this
thread count and this batch layout. Two float32 results that should agree (batched vs alone,
two equivalent code paths) each carry such an error, so they may differ by up to about twice
the floor; tests allow ``ROUNDING_PATHS`` × floor, which still fails by orders of magnitude on
a real bug (a mixed-up image, a wrong branch: differences of 1e-2 and more).
"""

from __future__ import annotations

import numpy as np

#: Two float32 rounding paths, each within the measured floor, plus a factor 2 of margin for the
#: spread of rounding errors between layouts.
ROUNDING_PATHS = 4.0
#: A floor is never taken below a few float32 ulps of the values compared (a computation that
#: happens to round exactly like float64 would otherwise allow no difference at all).
MIN_ULPS = 8


def noise_floor(float32_result, float64_result) -> float:
    """max |float32 − float64| of one computation, at least ``MIN_ULPS`` ulps of its magnitude."""
    a = np.asarray(float32_result, dtype=np.float64)
    b = np.asarray(float64_result, dtype=np.float64)
    ulp = float(np.finfo(np.float32).eps) * max(float(np.abs(b).max()), 1.0)
    return max(float(np.abs(a - b).max()), MIN_ULPS * ulp)


def tolerance(float32_result, float64_result) -> float:
    """What two float32 results of the computation may differ by: ``ROUNDING_PATHS`` × its noise floor."""
    return ROUNDING_PATHS * noise_floor(float32_result, float64_result)
