"""TensorRT calibration caches (implicit INT8, TensorRT 8.x-10.x): write ours, read anyone's.

The format is text: a header line ``TRT-<version>-<calibrator>`` (e.g. ``TRT-8601-EntropyCalibration2``), then
one ``<tensor name>: <hex>`` line per tensor, where ``<hex>`` is the big-endian hex of the float32 *scale*'s
bits (scale = amax / 127; ``3c010204`` is 1/127, i.e. amax 1.0). Names are the ONNX tensor names TensorRT's
ONNX parser gives the network's tensors. TensorRT 11 no longer reads these files; ``--trt-calib-cache`` turns
one into Q/DQ scales instead.
"""

from __future__ import annotations

import difflib
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from quantkit.calibrate.driver import CalibrationResult
from quantkit.errors import UsageError

DEFAULT_HEADER = "TRT-8601-EntropyCalibration2"  # TensorRT 8.6.1, the entropy calibrator v2 TensorRT recommends
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_LINE = re.compile(r"^(.+):\s*([0-9a-fA-F]{1,8})$")
QMAX = 127.0
# Scales a cache may give a quantized tensor. Below 2**-24 (FP16's smallest subnormal, 6e-8) the strongly typed
# graph's FP16 scale is 0 and every value quantizes to 0; above 65504 / 127 (amax past FP16's largest value) the
# FP16 layers TensorRT runs beside INT8 (--fp16, and the strong graph) overflow. A calibrator writes neither: such a
# scale is a corrupt or hand-edited cache. Float32 subnormals, 0, negatives, inf and NaN are refused on every line.
MIN_SCALE = 2.0 ** -24
MAX_SCALE = float(np.finfo(np.float16).max) / QMAX  # ~515.8, amax 65504
_FLOAT32_MIN_NORMAL = float(np.finfo(np.float32).tiny)  # 2**-126


def _quote(name: str) -> str:
    """A tensor name for a message, bounded (a cache line can hold megabytes)."""
    return repr(name) if len(name) <= 80 else repr(name[:77]) + f"... ({len(name):,} characters)"


def scale_to_hex(scale: float) -> str:
    """8 hex digits of the float32 bits of ``scale`` (big-endian, as TensorRT writes them)."""
    return struct.pack(">f", np.float32(scale)).hex()


def hex_to_scale(text: str) -> float:
    """The float32 value whose bits are the hex digits ``text`` (left-padded to 8)."""
    return float(np.frombuffer(bytes.fromhex(text.zfill(8)), dtype=">f4")[0])


def format_cache(scales: dict[str, float], header: str = DEFAULT_HEADER) -> str:
    """The cache text for ``scales`` (tensor -> float32 scale), names sorted so the bytes are deterministic."""
    if not _HEADER.match(header):
        raise UsageError(f"calibration cache header {header!r} must look like TRT-8601-EntropyCalibration2")
    bad = [n for n in scales if "\n" in n or not n.strip()]
    if bad:
        raise UsageError(f"tensor names {bad[:3]} cannot be written to a TensorRT calibration cache")
    lines = [header] + [f"{name}: {scale_to_hex(scales[name])}" for name in sorted(scales)]
    return "\n".join(lines) + "\n"


def parse_cache(text: str, source: str = "calibration cache") -> tuple[str, dict[str, float]]:
    """(header, tensor -> scale) of a cache's text; UsageError naming the line when it is not one, when a scale is
    not a finite positive normal float32 (0, negative, subnormal, inf, NaN), or when a tensor has two lines."""
    lines = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    if not lines or not _HEADER.match(lines[0].strip()):
        first = lines[0][:60] if lines else "<empty>"
        raise UsageError(f"{source} is not a TensorRT calibration cache: its first line {first!r} should look like "
                         "TRT-8601-EntropyCalibration2 (write it with TensorRT 8.x/10.x's calibrator or quantkit)")
    scales: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for k, ln in enumerate(lines[1:], start=2):
        m = _LINE.match(ln.strip())
        if not m:
            raise UsageError(f"{source} line {k} {ln[:80]!r} is not '<tensor>: <8 hex digits>'")
        name = m.group(1).strip()
        scale = hex_to_scale(m.group(2))
        if not (np.isfinite(scale) and scale >= _FLOAT32_MIN_NORMAL):
            what = "a float32 subnormal" if 0 < scale < _FLOAT32_MIN_NORMAL else "not a scale"
            raise UsageError(f"{source} line {k}: tensor {_quote(name)} has scale {scale:g} ({what}); scales must be "
                             "finite and > 0, normal float32 values (recalibrate that model)")
        if name in scales:  # TensorRT writes each tensor once: which line is right cannot be told
            raise UsageError(f"{source} lines {first_line[name]} and {k} both give tensor {_quote(name)} a scale "
                             f"({scales[name]:g}, {scale:g}): keep one line per tensor")
        scales[name] = scale
        first_line[name] = k
    if not scales:
        raise UsageError(f"{source} has a header but no tensor lines: it holds no scales")
    return lines[0].strip(), scales


def read_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """Read a cache file: (header, tensor -> scale)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"TensorRT calibration cache {p} does not exist: pass the calibration.cache file")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{p} is not a text TensorRT calibration cache ({exc})") from exc
    return parse_cache(text, str(p))


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """tensor -> scale of every activation QuantizeLinear of a Q/DQ graph (input = the float tensor's name).

    Weight quantizers (QuantizeLinear of an initializer, or int8 initializers) are not activations and are left
    out, as TensorRT's cache holds no weight scales. A tensor quantized twice must have one scale.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    const_vals = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    out: dict[str, float] = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.input[0] in consts:
            continue
        sname = n.input[1]
        if sname in inits:
            s = numpy_helper.to_array(inits[sname])
        elif sname in const_vals:
            s = numpy_helper.to_array(const_vals[sname].attribute[0].t)
        else:
            continue
        if s.size != 1:
            continue
        value = float(np.float32(s.reshape(())))
        prev = out.get(n.input[0])
        if prev is not None and prev != value:
            raise UsageError(f"tensor {n.input[0]!r} is quantized with two scales ({prev}, {value}); a TensorRT "
                             "cache holds one scale per tensor")
        out[n.input[0]] = value
    return out


def cache_text_for(model: onnx.ModelProto, header: str = DEFAULT_HEADER) -> str:
    """calibration.cache content for a Q/DQ graph: one line per quantized activation tensor."""
    return format_cache(activation_scales(model), header)


def amax_from_cache(scales: dict[str, float], needed: list[str], graph_tensors: set[str],
                    source: str = "calibration cache") -> dict[str, float]:
    """amax (= scale * 127, in float32) for each ``needed`` tensor, from a cache's scales.

    ``graph_tensors``: every tensor name in the graph. A cache name that is no tensor of the graph is an error
    listing the closest names (a misspelled or renamed tensor); a cache sharing no name with the graph is "for
    another model"; a needed tensor without a line is an error naming it (calibrate instead, or skip the layer).
    Cache lines for graph tensors quantkit does not quantize (TensorRT caches list every tensor) are ignored.
    A needed tensor's scale outside [MIN_SCALE, MAX_SCALE] is an error naming it.
    """
    known = [n for n in scales if n in graph_tensors]
    if not known:
        raise UsageError(f"{source} is for another model: none of its {len(scales)} tensor names (e.g. "
                         f"{', '.join(_quote(n) for n in sorted(scales)[:3])}) is a tensor of this graph. Pass the "
                         "cache written for this ONNX file, or calibrate with --calib")
    unknown = sorted(n for n in scales if n not in graph_tensors)
    if unknown:
        pool = sorted(graph_tensors)
        hints = "; ".join(  # difflib on a megabyte name would take minutes: compare its first 200 characters
            f"{_quote(n)} (closest: {', '.join(difflib.get_close_matches(n[:200], pool, n=3, cutoff=0.3)) or 'none'})"
            for n in unknown[:5])
        raise UsageError(f"{source}: {len(unknown)} tensor name(s) match no tensor of this graph: {hints}. "
                         "Fix the names or use the cache written for this model")
    missing = [t for t in needed if t not in scales]
    if missing:
        raise UsageError(f"{source} has no scale for {len(missing)} quantized tensor(s), e.g. "
                         f"{', '.join(_quote(n) for n in missing[:3])}: calibrate with --calib instead, or keep "
                         "those layers float with --skip")
    for t in needed:
        if not MIN_SCALE <= scales[t] <= MAX_SCALE:
            raise UsageError(f"{source}: tensor {_quote(t)} has scale {scales[t]:g} (amax {scales[t] * QMAX:g}), "
                             f"outside [{MIN_SCALE:.3g}, {MAX_SCALE:.4g}] (amax up to FP16's 65504): the cache is "
                             "corrupt or for another model; recalibrate, or keep that layer float with --skip")
    return {t: float(np.float32(scales[t]) * np.float32(QMAX)) for t in needed}


@dataclass
class CacheImport:
    """amax / act_scales: per INT8 activation tensor (ONNX names). from_cache / calibrated: tensors by source;
    kept_fp16: nodes demoted to FP16 (no scale in the cache) and kept_fp16_tensors their input tensors.
    calib: the calibration of the ``calibrated`` tensors (None when none ran)."""

    amax: dict[str, float]
    act_scales: dict[str, float]
    header: str
    from_cache: list[str]
    kept_fp16: list[str] = field(default_factory=list)
    kept_fp16_tensors: list[str] = field(default_factory=list)
    calibrated: list[str] = field(default_factory=list)
    calib: CalibrationResult | None = None
    cache_info: dict = field(default_factory=dict)
    mode: str = "fp16"  # calibration.trt_cache_missing

    def as_dict(self, path: str) -> dict:
        """The report's / calibration.json's description of where each scale came from."""
        return {"file": Path(path).name, "header": self.header, "missing": self.mode,
                "from_cache": sorted(self.from_cache), "kept_fp16_nodes": sorted(self.kept_fp16),
                "kept_fp16_tensors": sorted(self.kept_fp16_tensors), "calibrated": sorted(self.calibrated)}


def import_scales(path: str | Path, tensor_of: dict[str, str], int8: list[str], graph_tensors: set[str], *,
                  mode: str, what: str, fix: str) -> CacheImport:
    """The one missing-scale rule of ``--trt-calib-cache``, for both routes. ``tensor_of``: each quantizable
    layer / node -> the ONNX tensor its input quantizer reads; ``int8``: the layers INT8 now. A layer whose tensor
    has no line in the cache belongs to a layer the source kept FP16: with ``mode`` ``fp16`` it is listed in
    ``kept_fp16`` (the caller takes it out of its INT8 list), with ``calibrate`` its tensor is listed in
    ``calibrated`` (the caller calibrates it). ``amax`` / ``act_scales`` hold the cache's scales of the tensors the
    remaining INT8 layers read, in the order those layers first read them (amax = scale * 127, checked by :func:`amax_from_cache`); ``cache_info`` keys the
    import by the file's bytes. UsageError when nothing would be INT8 (``what``: "this graph" / "this model";
    ``fix``: what to pass instead)."""
    import hashlib

    header, scales = read_cache(path)
    layers = [n for n in int8 if n in tensor_of]
    missing = [n for n in layers if tensor_of[n] not in scales]
    out = CacheImport({}, {}, header, [], mode=mode)
    kept = list(int8)
    if missing and mode == "fp16":
        out.kept_fp16 = list(missing)
        out.kept_fp16_tensors = sorted({tensor_of[n] for n in missing})
        kept = [n for n in int8 if n not in set(missing)]
        if not kept and any(t in graph_tensors for t in scales):  # else: "for another model" in amax_from_cache
            raise UsageError(f"{path} has no scale for any tensor quantkit quantizes in {what}: nothing would be "
                             f"INT8. {fix}")
    elif missing:
        out.calibrated = sorted({tensor_of[n] for n in missing})
    out.from_cache = list(dict.fromkeys(tensor_of[n] for n in kept if n in tensor_of and tensor_of[n] in scales))
    out.amax = amax_from_cache(scales, out.from_cache, graph_tensors, source=str(path))
    out.act_scales = {t: float(np.float32(scales[t])) for t in out.from_cache}
    out.cache_info = {"key": "trt-cache-" + hashlib.sha256(Path(path).read_bytes()).hexdigest(), "hit": False,
                      "path": None, "reason": None}
    return out
