"""Calibration methods and their settings.

The method names are the strings recipes and the CLI use; inside the code use the enum members.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from quantkit.errors import UsageError

DEFAULT_PERCENTILE = 99.99  # percent of |x| kept unclipped by CalibMethod.PERCENTILE
DEFAULT_NUM_BINS = 2048  # histogram bins spanning the first batch's range
MIN_NUM_BINS = 128  # the entropy/mse search starts at bin 128 (pytorch-quantization's start_bin)


class CalibMethod(str, Enum):
    """How an activation's amax is chosen from its collected histogram."""

    MAX = "max"  # absolute maximum seen: no clipping, coarsest resolution
    PERCENTILE = "percentile"  # clip the top (100 - percentile) % of |x|
    ENTROPY = "entropy"  # minimise KL(float || int8) over the histogram (TensorRT's method)
    MSE = "mse"  # minimise the expected squared quantization error
    # a recipe-level choice, not a rule: the export measures the four above on held-out calibration images and
    # keeps the best per network (``quantkit.ptq.default_passes``); a calibrator is never asked for it
    AUTO = "auto"

    @classmethod
    def parse(cls, value: "str | CalibMethod") -> "CalibMethod":
        """Return the method named exactly by ``value`` (as recipes spell it); UsageError lists the names."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise UsageError(f"unknown calibration method {value!r}: use one of {allowed}") from None


@dataclass(frozen=True)
class MethodSettings:
    """One calibration method and its knobs.

    Attributes:
        method: which amax rule to apply.
        percentile: for PERCENTILE, the share of |x| kept unclipped, in percent (0, 100].
        num_bins: histogram bins spanning the first batch's range (collection-time setting).
        start_bin: smallest candidate threshold for ENTROPY / MSE, in bins; pytorch-quantization uses 128.
        num_bits: integer width of the quantized type (8 for int8).
        unsigned: quantize to [0, 2^bits - 1] instead of the symmetric signed range. TensorRT's
            int8 Q/DQ is signed, so keep False for anything that is exported.
    """

    method: CalibMethod
    percentile: float = DEFAULT_PERCENTILE
    num_bins: int = DEFAULT_NUM_BINS
    start_bin: int = MIN_NUM_BINS
    num_bits: int = 8
    unsigned: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibMethod.parse(self.method))
        if self.method is CalibMethod.AUTO:
            raise UsageError("calibration method 'auto' is chosen per network by the export; a calibrator needs "
                             "one rule: max, percentile, entropy or mse")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise UsageError(f"percentile must be in (0, 100], got {self.percentile}: e.g. 99.99")
        if int(self.num_bins) < MIN_NUM_BINS:
            raise UsageError(f"num_bins must be >= {MIN_NUM_BINS}, got {self.num_bins}: 2048 is the usual value")
        if not 1 <= int(self.start_bin) < int(self.num_bins):
            raise UsageError(
                f"start_bin must be in [1, num_bins={self.num_bins}), got {self.start_bin}: 128 is the usual value"
            )
        if not 2 <= int(self.num_bits) <= 16:
            raise UsageError(f"num_bits must be in [2, 16], got {self.num_bits}: use 8 for int8")

    @property
    def max_bound(self) -> int:
        """Largest quantized magnitude: 127 for signed int8, 255 for unsigned."""
        return (1 << (self.num_bits - 1 + int(self.unsigned))) - 1

    @property
    def levels(self) -> int:
        """Number of quantization cells on the |x| axis used by the entropy search (128 for int8)."""
        return 1 << (self.num_bits - 1 + int(self.unsigned))
