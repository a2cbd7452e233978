"""Integer model inputs (token ids, uint8 pixels, masks) in calibration data.

Every stage moves calibration samples as float32 (one packed tensor per batch, ``quantkit.data.inputs``). An
integer or bool array is carried there exactly (its values are checked to lie within +-2**24, where float32 holds
every integer) and turned back into its own type where it meets a model: the torch forward
(``inputs.adapt_model``: the dtype the array was saved with) and onnxruntime (``inputs.ort_feeds``: the graph
input's declared type).
"""

from __future__ import annotations

import numpy as np

from quantkit.errors import DataError

EXACT_INT_LIMIT = 2 ** 24  # float32 holds every integer of magnitude up to this exactly

# onnxruntime's input type strings -> numpy dtypes (float32 for anything else)
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
             "tensor(bool)": np.bool_}


def integer_dtype(arr: np.ndarray, where: str) -> str | None:
    """None for a float32 array; the dtype's name ("int64", "uint8", "bool", ...) for an integer or bool one whose
    values float32 holds exactly. DataError naming the fix for any other dtype or for integers beyond +-2**24."""
    dt = arr.dtype
    if dt == np.float32:
        return None
    if dt.kind in "iub":
        if dt.kind != "b" and arr.size:
            big = max(abs(int(arr.min())), abs(int(arr.max())))
            if big > EXACT_INT_LIMIT:
                raise DataError(f"{where} holds integers up to {big}; quantkit carries integer inputs exactly up to "
                                f"+-{EXACT_INT_LIMIT} (2**24): these values cannot be inputs it calibrates with")
        return dt.name
    raise DataError(f"{where} has dtype {dt}; calibration arrays must be float32 (preprocessed as the model expects; "
                    "convert with arr.astype(np.float32)) or integer / bool (token ids, uint8 pixels, masks)")


def ort_dtype(type_str: str):
    """The numpy dtype onnxruntime expects for an input of type ``type_str`` ("tensor(int64)", ...)."""
    return ORT_TYPES.get(type_str, np.float32)


def torch_dtype(name: str):
    """The torch dtype of the numpy dtype ``name`` ("int64" -> torch.int64, "bool" -> torch.bool)."""
    import torch

    return torch.from_numpy(np.zeros(0, dtype=np.dtype(name))).dtype


def check_integral(values: np.ndarray, where: str) -> None:
    """DataError unless every value is a whole number (what an integer graph input will receive)."""
    if values.size and not np.array_equal(values, np.rint(values)):
        raise DataError(f"{where} feeds an integer model input but holds fractional values: save the array with its "
                        "integer dtype (token ids, uint8 pixels), not rescaled floats; for an image folder feeding "
                        "uint8 pixels, set preprocess.scale to 1")


__all__ = ["EXACT_INT_LIMIT", "ORT_TYPES", "integer_dtype", "ort_dtype", "torch_dtype", "check_integral"]
