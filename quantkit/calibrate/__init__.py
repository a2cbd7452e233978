"""Calibration stage: histogram collection, max/percentile/entropy/mse amax search, the result cache.

Entry: :func:`calibrate` (prepared model + data + ``CalibrationSpec`` -> ``Calibration``).
"""


def calibrate(*args, **kwargs):
    """See :func:`quantkit.calibrate.run.calibrate` (imported on first use: the recipe imports
    ``quantkit.calib_methods``, which must not pull the whole stage in)."""
    from quantkit.calibrate.run import calibrate as _calibrate

    return _calibrate(*args, **kwargs)
