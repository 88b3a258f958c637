"""Float tolerances from a measured noise floor, not from one machine's run.

The noise floor of a float32 computation is how far its result lies from the same computation
in float64 (same inputs, same code): the rounding error float32 adds here, with this BLAS, this
thread count and this batch layout. Two float32 results that should agree (batched vs alone,
two equivalent code paths) each carry such an error, so they may differ by up to about twice
the floor; tests allow ``ROUNDING_PATHS`` × floor, which still fails by orders of magnitude on
a real bug (a mixed-up image, a wrong branch: differences of 1e-2 and more).
"""

from __future__ import annotations

import contextlib
import sys

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


#: float64's machine epsilon: the unit of the float64 floors below.
EPS64 = float(np.finfo(np.float64).eps)
#: float32's machine epsilon.
EPS32 = float(np.finfo(np.float32).eps)
#: A "must differ" assertion asks for a difference this many times the noise tolerance: a real
#: effect (another branch, another image) is orders of magnitude above rounding, so the factor
#: leaves no doubt without tying the test to one machine's numbers.
DISTINCT = 100.0
#: Half a step of an 8-bit image: what rounding a float image to PNG adds at most.
HALF_8BIT = 0.5 / 255


def float64_tolerance(*values, ops: int = 16) -> float:
    """Absolute tolerance for a float64 computation of about ``ops`` rounding steps on ``values``.

    Each IEEE operation rounds to within half an ulp, so ``ops`` steps on numbers of this
    magnitude are off by at most ``ops`` ulps; the tolerance allows ``ROUNDING_PATHS`` times that
    (two paths compared, each with its own rounding). Used where the float64 result is the
    reference itself (Python scalars, numpy float64 statistics), so no float64 rerun exists.
    """
    scale = max([1.0] + [float(np.abs(np.asarray(v, dtype=np.float64)).max()) for v in values])
    return ROUNDING_PATHS * ops * EPS64 * scale


def float32_tolerance(*values, ops: int = 16) -> float:
    """As :func:`float64_tolerance`, for a float32 computation that cannot be rerun in float64."""
    scale = max([1.0] + [float(np.abs(np.asarray(v, dtype=np.float64)).max()) for v in values])
    return ROUNDING_PATHS * ops * EPS32 * scale


def to_float64(module):
    """A float64 deep copy of a torch module (the reference run of :func:`tolerance`)."""
    import copy

    return copy.deepcopy(module).double()


# Noise for pipeline runs (diffusers' random draws), imported lazily: this module is also used
# by tests that need neither torch nor diffusers.

@contextlib.contextmanager
def _noise_changed(change):
    """diffusers' random draws (initial latents, ancestral step noise) passed through ``change(draw, shape, **kw)``."""
    import pytest
    from diffusers.utils.torch_utils import randn_tensor as draw

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return change(draw, shape, generator=generator, device=device, dtype=dtype, layout=layout)

    with pytest.MonkeyPatch.context() as patch:
        for name, module in list(sys.modules.items()):
            if name.startswith("diffusers") and vars(module).get("randn_tensor") is draw:
                patch.setattr(module, "randn_tensor", randn_tensor)
        yield


def float32_noise():
    """Random draws made in float32 whatever the dtype. From one generator torch.randn draws other
    numbers in float64 than in float32, so a float64 run would start from other noise; under this it
    runs on the float32 run's noise, cast: the same inputs, as the noise floor above needs."""
    import torch

    def change(draw, shape, dtype=None, **kw):
        wide = dtype == torch.float64
        noise = draw(shape, dtype=torch.float32 if wide else dtype, **kw)
        return noise.to(dtype) if wide else noise

    return _noise_changed(change)


def moved_noise(seed: int = 0):
    """Random draws each moved by one ulp, up or down at random: a run under this is the same
    computation with one more rounding of its inputs, i.e. another float32 rounding draw of it."""
    import torch

    signs = torch.Generator().manual_seed(seed)

    def change(draw, shape, **kw):
        noise = draw(shape, **kw)
        up = torch.rand(noise.shape, generator=signs) < 0.5
        return torch.nextafter(noise, torch.where(up, torch.inf, -torch.inf).to(noise.dtype))

    return _noise_changed(change)
