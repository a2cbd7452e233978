"""Single-pass collectors: a growing histogram of |x| for activations, an abs-max for weights.

``HistogramCollector`` never stores activations. Its bin width is fixed by the first batch that is
not all zeros (``max|x| / num_bins``); a later batch beyond the range appends bins of the same width,
so earlier counts never move (pytorch-quantization's HistogramCalibrator grows the same way). Only
when the bin count would pass ``max_bins`` are adjacent bins merged by an integer factor: merged bins
nest exactly in the wider ones, so this loses resolution but never misplaces a count. Every
method's amax then comes from the one histogram (``all_amax``), so trying methods costs no new pass.

Bins are half-open on the left: bin j holds ``(j * width, (j + 1) * width]``; exact zeros are
counted apart (``zero_count``) and reported inside bin 0, which lets the mse search treat them as
error-free and the entropy search ignore them as TensorRT does.

An all-zero tensor yields amax 0.0 for every method. That is not an error here: the caller decides
(disable that quantizer, or raise CalibrationError naming the layer).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from quantkit.calibrate import search
from quantkit.calib_methods import CalibMethod, MethodSettings
from quantkit.errors import CalibrationError, UsageError
from quantkit.quote import qcap

_STATE_VERSION = 1
_CHUNK = 1 << 18  # elements per scratch chunk (1 MiB of float32: stays in cache between the passes over it)
_SCRATCH = threading.local()  # per-thread reusable chunk buffers, see _scratch()


def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32, int32) buffers of ``_CHUNK`` elements on ``device``, reused across calls in this thread.

    Allocating them per call cost about a third of the collection time: buffers this large come from
    fresh pages every time (mmap), and faulting those in costs more than the arithmetic on them.
    """
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    if device not in bufs:
        bufs[device] = (torch.empty(_CHUNK, dtype=torch.float32, device=device),
                        torch.empty(_CHUNK, dtype=torch.int32, device=device))  # int32: faster bincount
    return bufs[device]


@dataclass
class _SeenTensor:
    ref: weakref.ref
    version: int
    minmax: tuple[float, float] | None = None
    hists: dict[tuple[float, int], torch.Tensor] = field(default_factory=dict)  # (width, bins) -> counts


class SharedBatchStats:
    """Per-batch memo shared by the collectors of one calibration pass.

    A tensor that feeds several quantizers (a CSP stage's input feeds two convs; concat inputs share their
    consumer's scale) is the same tensor object at each of them: its min/max, and its histogram for a given
    (bin width, bin count), are computed once and reused. Entries are keyed by object identity and checked
    through a weak reference and the tensor's version counter, so a freed tensor whose memory is reused, or
    a tensor modified in place, is never mistaken for a seen one; nothing here keeps an activation alive, and
    an entry is dropped when its tensor is freed.
    """

    def __init__(self) -> None:
        self._seen: dict[int, _SeenTensor] = {}

    def entry(self, x: torch.Tensor) -> _SeenTensor | None:
        key = id(x)
        e = self._seen.get(key)
        try:
            version = x._version
            if e is not None and e.ref() is x and e.version == version:
                return e
            ref = weakref.ref(x, lambda r: self._forget(key, r))  # the entry goes when the tensor does
        except (RuntimeError, TypeError):  # inference-mode tensors have no version counter
            return None
        e = self._seen[key] = _SeenTensor(ref, version)
        return e

    def _forget(self, key: int, ref: weakref.ref) -> None:
        e = self._seen.get(key)
        if e is not None and e.ref is ref:
            del self._seen[key]

    def __len__(self) -> int:
        """Entries held (one per live tensor seen)."""
        return len(self._seen)


def _check_finite(value: float, name: str | None, what: str) -> None:
    if not math.isfinite(value):
        label = f"tensor {name!r}" if name else "an unnamed tensor"
        raise CalibrationError(
            f"NaN or Inf in the {what} of {label}: calibrate on finite data "
            "(check the input preprocessing, the weights, and that the model runs in float32)"
        )


class HistogramCollector:
    """Histogram of |x| for one activation tensor, collected batch by batch.

    Args:
        name: the tensor's name, used in error messages.
        num_bins: bins spanning the first non-zero batch's range (2048 like TensorRT).
        max_bins: cap on the bin count as the range grows; default ``8 * num_bins``.
        shared: a per-batch memo shared with the other collectors of the same pass (see SharedBatchStats).
    """

    def __init__(self, name: str | None = None, num_bins: int = 2048, max_bins: int | None = None,
                 shared: SharedBatchStats | None = None) -> None:
        self.name = name
        self.shared = shared
        self.num_bins = int(num_bins)
        self.max_bins = int(max_bins) if max_bins is not None else 8 * self.num_bins
        if self.num_bins < 16 or self.max_bins < self.num_bins:
            raise UsageError(
                f"histogram for {name!r}: need 16 <= num_bins <= max_bins, got {num_bins}, {max_bins} "
                "(2048 bins is the usual setting)"
            )
        self.reset()

    def reset(self) -> None:
        """Forget everything collected."""
        self._counts: torch.Tensor | None = None  # int64, non-zero values only, bin j = (j*w, (j+1)*w]
        self._width: float | None = None
        self._zero_count = 0
        self._num_values = 0
        self._amax: float | None = None

    # ------------------------------------------------------------------ collection
    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Add one batch's |x| to the histogram. Raises CalibrationError on NaN/Inf."""
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        seen = self.shared.entry(x) if self.shared is not None else None
        if seen is not None and seen.minmax is not None:
            lo, hi = seen.minmax
        else:
            lo, hi = torch.aminmax(flat)  # one pass; NaN propagates into both, Inf into one
            lo, hi = float(lo), float(hi)
            if seen is not None:
                seen.minmax = (lo, hi)
        _check_finite(lo, self.name, "collected data")
        _check_finite(hi, self.name, "collected data")
        batch_max = max(-lo, hi)
        self._amax = batch_max if self._amax is None else max(self._amax, batch_max)
        self._num_values += flat.numel()
        if batch_max == 0.0:
            self._zero_count += flat.numel()
            return
        if self._width is None:
            self._width = batch_max / self.num_bins
            self._counts = torch.zeros(self.num_bins, dtype=torch.int64, device=flat.device)
        else:
            self._grow(batch_max)
        n = self._counts.numel()
        if self._counts.device != flat.device:
            self._counts = self._counts.to(flat.device)
        key = (self._width, n)
        hist = seen.hists.get(key) if seen is not None else None
        if hist is None:
            hist = self._bin(flat, n)
            if seen is not None:
                seen.hists[key] = hist
        self._zero_count += int(hist[0])
        self._counts += hist[1:]

    def _bin(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """Counts of one batch: slot 0 = exact zeros, slot j = bin j-1 of the current width (n + 1 slots)."""
        hist = torch.zeros(n + 1, dtype=torch.int64, device=flat.device)
        inv_width = 1.0 / self._width
        size = min(_CHUNK, flat.numel())
        # Reused cache-sized scratch buffers: whole-tensor temporaries (|x|, then int indices) cost more in
        # fresh-page faults than the arithmetic itself on a large feature map.
        buf, slots = _scratch(flat.device)
        for start in range(0, flat.numel(), size):
            chunk = flat[start : start + size]
            f, s = buf[: chunk.numel()], slots[: chunk.numel()]
            if chunk.dtype == torch.float32:
                torch.abs(chunk, out=f)
            else:
                f.copy_(chunk).abs_()
            # slot = ceil(|x| / width): 0 for exact zeros, 1..n for the bins; clamp absorbs roundoff
            s.copy_(f.mul_(inv_width).ceil_().clamp_(max=n))
            hist += torch.bincount(s, minlength=n + 1)
        return hist

    def _grow(self, batch_max: float) -> None:
        n = self._counts.numel()
        need = math.ceil(batch_max / self._width)
        if need <= n:
            return
        if need > self.max_bins:
            factor = math.ceil(need / self.max_bins)
            padded = math.ceil(n / factor) * factor
            merged = torch.nn.functional.pad(self._counts, (0, padded - n))
            self._counts = merged.view(-1, factor).sum(dim=1)
            self._width *= factor
            n = self._counts.numel()
            need = math.ceil(batch_max / self._width)
        if need > n:
            self._counts = torch.nn.functional.pad(self._counts, (0, need - n))

    # ------------------------------------------------------------------ queries
    @property
    def num_values(self) -> int:
        """Number of scalars collected so far."""
        return self._num_values

    @property
    def zero_count(self) -> int:
        """Number of exact zeros collected (e.g. ReLU outputs)."""
        return self._zero_count

    def amax_max(self) -> float:
        """Largest |x| seen (the MAX method's amax), exactly as torch computed it."""
        self._require_data()
        return float(self._amax)

    def histogram(self) -> tuple[np.ndarray, float]:
        """(counts, width): counts of |x| per bin with exact zeros inside bin 0, bin width in data units.

        An all-zero collection returns ``(array([zero_count]), 0.0)``.
        """
        self._require_data()
        if self._counts is None:
            return np.array([self._zero_count], dtype=np.int64), 0.0
        counts = self._counts.cpu().numpy().astype(np.int64)
        counts[0] += self._zero_count
        return counts, float(self._width)

    def compute_amax(self, settings: MethodSettings) -> float:
        """amax for ``settings.method``, in the data's units, never above the largest |x| seen.

        Returns 0.0 when every collected value was zero (see the module docstring).
        """
        self._require_data()
        if self._amax == 0.0 or self._counts is None:
            return 0.0
        counts, width = self.histogram()
        method = settings.method
        if method is CalibMethod.MAX:
            return float(self._amax)
        if method is CalibMethod.PERCENTILE:
            amax = search.amax_percentile(counts, width, settings.percentile, self._zero_count)
        elif method is CalibMethod.ENTROPY:
            amax = search.amax_entropy(counts, width, settings.start_bin, settings.levels)
        elif method is CalibMethod.MSE:
            amax = search.amax_mse(counts, width, settings.start_bin, settings.max_bound, self._zero_count)
        else:  # pragma: no cover - CalibMethod is closed
            raise CalibrationError(f"no amax rule for {method!r}")
        return float(min(amax, self._amax))

    def all_amax(
        self, percentiles: Iterable[float] = (99.9, 99.99, 99.999), settings: MethodSettings | None = None
    ) -> dict[str, float]:
        """amax of every method from the one histogram.

        Keys: ``"max"``, ``"percentile_<p>"`` for each p (e.g. ``"percentile_99.99"``), ``"entropy"``,
        ``"mse"``. ``settings`` supplies start_bin / num_bits / unsigned (default: int8 signed).
        """
        base = settings if settings is not None else MethodSettings(CalibMethod.ENTROPY)
        out = {"max": self.compute_amax(_with(base, CalibMethod.MAX))}
        for p in percentiles:
            out[f"percentile_{float(p):g}"] = self.compute_amax(_with(base, CalibMethod.PERCENTILE, percentile=p))
        out["entropy"] = self.compute_amax(_with(base, CalibMethod.ENTROPY))
        out["mse"] = self.compute_amax(_with(base, CalibMethod.MSE))
        return out

    def _require_data(self) -> None:
        if self._amax is None:
            raise CalibrationError(
                f"no data was collected for tensor {qcap(self.name)}: the calibration loop never reached it "
                "(check that the layer runs in forward and that the loader is not empty)"
            )

    # ------------------------------------------------------------------ persistence
    def content_key(self) -> tuple:
        """Everything every method's amax depends on: collectors with equal keys give equal amaxes."""
        counts = None if self._counts is None else self._counts.cpu().numpy().tobytes()
        return (self.num_bins, self.max_bins, self._width, counts, self._zero_count, self._num_values, self._amax)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain ints, floats, lists) for the calibration cache."""
        return {
            "version": _STATE_VERSION,
            "name": self.name,
            "num_bins": self.num_bins,
            "max_bins": self.max_bins,
            "width": self._width,
            "counts": None if self._counts is None else [int(c) for c in self._counts.cpu().tolist()],
            "zero_count": self._zero_count,
            "num_values": self._num_values,
            "amax": self._amax,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; CalibrationError if it is inconsistent."""
        try:
            if state["version"] != _STATE_VERSION:
                raise ValueError(f"state version {state['version']} != {_STATE_VERSION}")
            counts, width, amax = state["counts"], state["width"], state["amax"]
            zero_count, num_values = int(state["zero_count"]), int(state["num_values"])
            if (counts is None) != (width is None):
                raise ValueError("counts and width must both be set or both be null")
            tensor = None if counts is None else torch.tensor(counts, dtype=torch.int64)
            nonzero = 0 if tensor is None else int(tensor.sum())
            if tensor is not None and (tensor.dim() != 1 or (tensor < 0).any() or not width > 0):
                raise ValueError("counts must be a flat list of non-negative ints and width > 0")
            if nonzero + zero_count != num_values or (amax is None) != (num_values == 0):
                raise ValueError("counts, zero_count, num_values and amax disagree")
            if amax is not None:
                _check_finite(float(amax), self.name, "stored amax")
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(
                f"histogram state for tensor {qcap(self.name)} is unusable ({exc}): delete the calibration cache"
            ) from exc
        self.num_bins, self.max_bins = int(state["num_bins"]), int(state["max_bins"])
        self._counts, self._width = tensor, None if width is None else float(width)
        self._zero_count, self._num_values = zero_count, num_values
        self._amax = None if amax is None else float(amax)


def _with(base: MethodSettings, method: CalibMethod, **changes: Any) -> MethodSettings:
    from dataclasses import replace

    return replace(base, method=method, **changes)


class MaxCollector:
    """Running abs-max, per channel along ``axis`` (weights) or per tensor (``axis=None``).

    The amax keeps the tensor's rank with size 1 on the reduced dims, pytorch-quantization's layout:
    ``[C, 1, 1, 1]`` for a conv weight with axis 0, ``[C, 1]`` for a linear weight, ``[]`` per tensor.
    A channel whose weights are all zero gets amax 0.0; the caller decides what to do with it.
    """

    def __init__(self, axis: int | None = 0, name: str | None = None) -> None:
        self.axis = axis
        self.name = name
        self._amax: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget everything collected."""
        self._amax = None

    @torch.no_grad()
    def collect(self, x: torch.Tensor) -> None:
        """Fold ``x``'s abs-max into the running amax. Raises CalibrationError on NaN/Inf."""
        a = x.detach().abs().float()
        if self.axis is None:
            amax = a.max() if a.numel() else torch.zeros(())
        else:
            if a.dim() == 0:
                raise CalibrationError(f"tensor {qcap(self.name)} is a scalar: use axis=None for a per-tensor amax")
            axis = self.axis % a.dim()
            dims = [d for d in range(a.dim()) if d != axis]
            amax = a.amax(dim=dims, keepdim=True) if dims else a.clone()
        _check_finite(float(amax.max()), self.name, "collected data")
        if self._amax is None:
            self._amax = amax
        elif self._amax.shape != amax.shape:
            raise CalibrationError(
                f"tensor {qcap(self.name)} changed shape between batches ({tuple(self._amax.shape)} -> "
                f"{tuple(amax.shape)}): per-channel amax needs a fixed channel count"
            )
        else:
            self._amax = torch.maximum(self._amax, amax.to(self._amax.device))

    def compute_amax(self) -> torch.Tensor:
        """The running amax (float32 tensor, see the class docstring for its shape)."""
        if self._amax is None:
            raise CalibrationError(f"no data was collected for tensor {qcap(self.name)}")
        return self._amax.clone()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the amax as a flat list plus its shape."""
        if self._amax is None:
            return {"axis": self.axis, "shape": None, "amax": None}
        return {"axis": self.axis, "shape": list(self._amax.shape), "amax": self._amax.flatten().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; CalibrationError if it is inconsistent."""
        try:
            self.axis = state["axis"]
            amax = None if state["amax"] is None else torch.tensor(state["amax"], dtype=torch.float32)
            self._amax = None if amax is None else amax.reshape(state["shape"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CalibrationError(f"max state for tensor {qcap(self.name)} is unusable ({exc})") from exc
