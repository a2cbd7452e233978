"""Signal-to-quantization-noise ratio (dB) between a reference output and a quantized/exported one.

SQNR = 10·log10(Σ ref² / Σ (ref − test)²), accumulated in float64. 20 dB means the error has a tenth of the
reference's RMS amplitude; every 6 dB halves it. Identical outputs give +inf.
"""

from __future__ import annotations

import math

import numpy as np

from quantkit.errors import UsageError


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _flatten_outputs(x) -> list[np.ndarray]:
    """A tensor, or a (nested) tuple/list of tensors, as a flat list of float64 arrays."""
    if isinstance(x, (tuple, list)):
        out: list[np.ndarray] = []
        for item in x:
            out.extend(_flatten_outputs(item))
        return out
    return [_as_numpy(x)]


def _pairs(reference, test) -> list[tuple[np.ndarray, np.ndarray]]:
    refs, tests = _flatten_outputs(reference), _flatten_outputs(test)
    if len(refs) != len(tests):
        raise UsageError(f"reference has {len(refs)} outputs but test has {len(tests)}: compare the same model's outputs")
    for i, (r, t) in enumerate(zip(refs, tests)):
        if r.shape != t.shape:
            raise UsageError(f"output {i}: reference shape {r.shape} != test shape {t.shape}: compare matching outputs")
        if not np.all(np.isfinite(r)):
            raise UsageError(f"output {i}: the reference contains NaN/Inf, so SQNR is meaningless: fix the FP32 model")
    return list(zip(refs, tests))


def _db(signal: float, noise: float) -> float:
    if not math.isfinite(noise):
        return -math.inf  # a non-finite test output has destroyed the signal; -inf fails every gate
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _energies(r: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    if not np.all(np.isfinite(t)):
        return float(np.sum(r * r)), math.inf
    d = r - t
    return float(np.sum(r * r)), float(np.sum(d * d))


def sqnr_db(reference, test) -> float:
    """SQNR in dB of ``test`` against ``reference`` over all elements of all outputs together.

    Either argument may be a numpy array, a torch tensor, or a (nested) tuple/list of them (the outputs are
    flattened and concatenated). +inf when identical, -inf when the reference is all zeros but the test is
    not, or when the test has NaN/Inf (so an accuracy gate fails). Shapes must match.
    """
    signal = noise = 0.0
    for r, t in _pairs(reference, test):
        s, n = _energies(r, t)
        signal += s
        noise += n
    return _db(signal, noise)


def per_output_sqnr(reference, test) -> list[float]:
    """SQNR in dB of each output separately (same flattening order as ``sqnr_db``)."""
    return [_db(*_energies(r, t)) for r, t in _pairs(reference, test)]


class SqnrAccumulator:
    """Running SQNR over many batches without keeping them: ``update(ref, test)`` per batch, then ``value()``.

    Sums signal and noise energies per output, so the result equals ``sqnr_db`` / ``per_output_sqnr`` of the
    concatenated batches.
    """

    def __init__(self) -> None:
        self._signal: list[float] = []
        self._noise: list[float] = []

    def update(self, reference, test) -> None:
        pairs = _pairs(reference, test)
        if not self._signal:
            self._signal, self._noise = [0.0] * len(pairs), [0.0] * len(pairs)
        elif len(pairs) != len(self._signal):
            raise UsageError(f"batch has {len(pairs)} outputs, earlier batches had {len(self._signal)}")
        for i, (r, t) in enumerate(pairs):
            s, n = _energies(r, t)
            self._signal[i] += s
            self._noise[i] += n

    def value(self) -> float:
        """Overall SQNR (dB) of everything seen so far; raises if nothing was added."""
        if not self._signal:
            raise UsageError("no batches were added to the SQNR accumulator: call update() first")
        return _db(sum(self._signal), sum(self._noise))

    def per_output(self) -> list[float]:
        """Per-output SQNR (dB) of everything seen so far."""
        if not self._signal:
            raise UsageError("no batches were added to the SQNR accumulator: call update() first")
        return [_db(s, n) for s, n in zip(self._signal, self._noise)]

