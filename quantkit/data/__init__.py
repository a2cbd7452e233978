"""Calibration data: image folders and preprocessed ``.npy`` arrays, streamed in batches.

Entry: :func:`open_data` (path + recipe sections + input size -> ``CalibrationData``, ``Preprocess``).
"""

from quantkit.data.calib import CalibrationData, open_calibration_data, open_data

__all__ = ["CalibrationData", "open_data", "open_calibration_data"]
