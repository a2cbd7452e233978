"""Per-layer T4 latency ESTIMATE: a roofline model, not a measurement.

For every quantizable layer the model records, with forward hooks on one input, the shapes it sees and
derives closed-form work:

* FLOPs = 2 x MACs (Conv2d: N·Cout·Hout·Wout·(Cin/groups)·kh·kw; ConvTranspose2d: N·Cin·Hin·Win·(Cout/groups)·kh·kw;
  1-D / 3-D convs alike; Linear: rows·in·out; residual Add: one op per output element);
* bytes moved = (input + weights (+ bias) + output) elements x element size: 2 B at FP16, 1 B at INT8; except a
  residual Add (see below).

Residual Adds and the fusion they break. An INT8 Add (Q/DQ on its skip input) fuses into the epilogue of the conv
that produces its main input: it costs only reading the skip operand, 1 B per element, and no kernel of its own.
An Add kept FP16 does not fuse: it runs as its own elementwise kernel that reads both operands and writes its output
at 2 B per element (the producing conv's output now round-trips memory). So keeping an Add FP16 adds
``((inputs + output) x 2 B - skip x 1 B) / bandwidth`` — memory-bound at T4 bandwidth, e.g. 21 us for a 64x80x80
map at 320 GB/s x 0.30. :func:`mac_equivalents` turns that extra time into the number of conv MACs whose move to
FP16 costs the same, so a MAC-share budget charges an FP16 Add for the fusion it breaks instead of counting it free.

time = max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)), with T4 peaks of 65 TFLOPS FP16,
130 TOPS INT8 (tensor cores) and 320 GB/s. Everything outside the quantizable layers (pooling, concat,
resize, decode) is counted once, at FP16, as a fixed overhead (ops seen through a dispatch mode; views are
free and pointwise ops are assumed fused into their producer, as TensorRT does).

Assumptions, stated wherever a number is printed (``ESTIMATE_LABEL``): one efficiency factor for compute and
memory alike; no fusion modelling beyond the above (Conv+act fusion is implicit, conv+add as described,
reformat layers at INT8/FP16 boundaries are not counted); no kernel launch overheads; no tactic selection. The
estimate ranks layers and configurations; only a TensorRT build on a T4 gives real latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from quantkit.errors import ModelError, UsageError
from quantkit.models.ops import Add
from quantkit.quant.registry import weighted_kind

ESTIMATE_LABEL = "estimated T4 latency (roofline model, not measured)"


class Precision(Enum):
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of the target. ``efficiency``: fraction of peak compute and bandwidth reached (both).

    0.30 puts the FP16 estimate of YOLO-NAS S (640x640, batch 1) near its published 3.21 ms T4 latency
    (see benchmarks/RESULTS.md); it is one fitted constant, not a per-layer calibration.
    """

    name: str = "T4"
    fp16_tflops: float = 65.0
    int8_tops: float = 130.0
    bandwidth_gbs: float = 320.0
    efficiency: float = 0.30

    def bytes_per_element(self, p: Precision) -> int:
        return 1 if p is Precision.INT8 else 2

    def peak_ops_per_s(self, p: Precision) -> float:
        return (self.int8_tops if p is Precision.INT8 else self.fp16_tflops) * 1e12

    def fp16_extra_ms_per_mac(self) -> float:
        """Estimated ms one compute-bound conv MAC (2 FLOPs) adds when it runs FP16 instead of INT8."""
        return 1e3 * 2.0 * (1.0 / self.peak_ops_per_s(Precision.FP16) - 1.0 / self.peak_ops_per_s(Precision.INT8)) \
            / self.efficiency

    def roofline_ms(self, flops: float, nbytes: float, p: Precision) -> float:
        """max(compute time, memory time) in milliseconds at this device's efficiency."""
        compute = flops / (self.peak_ops_per_s(p) * self.efficiency)
        memory = nbytes / (self.bandwidth_gbs * 1e9 * self.efficiency)
        return 1e3 * max(compute, memory)


T4 = DeviceSpec()


@dataclass(frozen=True)
class LayerCost:
    """Closed-form work of one quantizable layer for the recorded batch. Element counts, not bytes."""

    name: str
    type: str
    flops: float
    input_elements: int
    weight_elements: int
    output_elements: int

    def bytes(self, p: Precision, spec: DeviceSpec = T4) -> float:
        """Bytes moved at precision ``p``. A residual Add at INT8 is fused into its producer's epilogue (reads the
        skip operand only); at FP16 it is an unfused kernel (reads both operands, writes the output); see the
        module docstring."""
        if self.type == "Add":
            if p is Precision.INT8:
                return float(max(self.input_elements - self.output_elements, 0)) * spec.bytes_per_element(p)
            return float(self.input_elements + self.output_elements) * spec.bytes_per_element(p)
        return float(self.input_elements + self.weight_elements + self.output_elements) * spec.bytes_per_element(p)

    def time_ms(self, p: Precision, spec: DeviceSpec = T4) -> float:
        """Roofline time in ms (an ESTIMATE) at precision ``p``."""
        return spec.roofline_ms(self.flops, self.bytes(p, spec), p)

    def fp16_extra_ms(self, spec: DeviceSpec = T4) -> float:
        """Estimated ms this layer adds when kept in FP16 instead of INT8 (>= 0)."""
        return self.time_ms(Precision.FP16, spec) - self.time_ms(Precision.INT8, spec)


@dataclass
class CostTable:
    """Per-layer costs plus the fixed FP16 overhead of the non-quantizable work, for ``batch`` inputs."""

    layers: dict[str, LayerCost]
    overhead_flops: float
    overhead_bytes_fp16: float
    batch: int
    input_shape: tuple[int, ...]
    spec: DeviceSpec = T4
    notes: list[str] = field(default_factory=list)

    @property
    def overhead_ms(self) -> float:
        return self.spec.roofline_ms(self.overhead_flops, self.overhead_bytes_fp16, Precision.FP16)

    def layer_ms(self, name: str, p: Precision) -> float:
        return self.layers[name].time_ms(p, self.spec)

    def as_dict(self) -> dict:
        """JSON-ready, deterministic (rounded) form; every time is labelled an estimate."""
        s = self.spec
        return {
            "label": ESTIMATE_LABEL,
            "device": {"name": s.name, "fp16_tflops": s.fp16_tflops, "int8_tops": s.int8_tops,
                       "bandwidth_gbs": s.bandwidth_gbs, "efficiency": s.efficiency},
            "batch": self.batch,
            "input_shape": list(self.input_shape),
            "estimated_ms": {
                "fp16": round(estimate_latency_ms(self, ()), 5),
                "int8": round(estimate_latency_ms(self, self.layers), 5),
                "overhead_fp16": round(self.overhead_ms, 5),
            },
            "layers": {
                n: {"type": c.type, "gflops": round(c.flops / 1e9, 6), "mb_fp16": round(c.bytes(Precision.FP16, s) / 1e6, 6),
                    "ms_fp16": round(c.time_ms(Precision.FP16, s), 6), "ms_int8": round(c.time_ms(Precision.INT8, s), 6)}
                for n, c in self.layers.items()
            },
            "assumptions": ("roofline max(FLOPs/peak, bytes/bandwidth) x 1/efficiency; 1-byte INT8 and 2-byte "
                            "FP16 tensors; pointwise ops fused, views free; an INT8 residual Add fused into its "
                            "conv (reads the skip only), an FP16 one unfused (reads both inputs, writes the "
                            "output); no reformat or launch overheads"),
            "notes": list(self.notes),
        }


def estimate_latency_ms(costs: CostTable, int8_layers) -> float:
    """ESTIMATED T4 latency in ms of one batch of ``costs.batch`` inputs with ``int8_layers`` in INT8 and every
    other quantizable layer in FP16, plus the fixed FP16 overhead (roofline model, not measured)."""
    int8 = set(int8_layers)
    unknown = int8 - set(costs.layers)
    if unknown:
        raise UsageError(f"layers {sorted(unknown)[:5]} are not in the cost table: use names from the layout")
    total = costs.overhead_ms
    for name, c in costs.layers.items():
        total += c.time_ms(Precision.INT8 if name in int8 else Precision.FP16, costs.spec)
    return total


def latency_section(costs: CostTable, layers, int8_layers) -> dict:
    """report.json's ``latency_estimate``: ESTIMATED T4 ms of FP16 (no INT8), full INT8 (every one of ``layers``)
    and the export (``int8_layers`` INT8, labelled hybrid when some layers are not), with the model's caveats."""
    layers, int8 = list(layers), list(int8_layers)
    ms = {"FP16 (no INT8)": estimate_latency_ms(costs, set()),
          "full INT8": estimate_latency_ms(costs, set(layers)),
          "exported (hybrid)" if len(int8) < len(layers) else "exported": estimate_latency_ms(costs, set(int8))}
    return {"ms": {k: round(v, 4) for k, v in ms.items()}, "batch": costs.batch, "label": ESTIMATE_LABEL,
            "note": f"{ESTIMATE_LABEL}: per-layer FLOPs and bytes against T4 peaks (65 TFLOPS FP16, 130 TOPS INT8, "
                    "320 GB/s) with one fitted efficiency factor; an FP16 residual Add is charged for the conv+add fusion it "
                    "breaks (an unfused kernel at T4 bandwidth). Measure on a T4 with build_engine.sh."}


def mac_equivalents(costs: CostTable) -> dict[str, float]:
    """Residual Add -> the conv MACs whose move from INT8 to FP16 would cost the same estimated time as keeping
    this Add FP16 (the unfused kernel it becomes; see the module docstring). A MAC-share budget spends this on an
    FP16 Add, which otherwise has no MACs and would look free. Other layer types are not listed."""
    per_mac = costs.spec.fp16_extra_ms_per_mac()
    return {n: c.fp16_extra_ms(costs.spec) / per_mac for n, c in costs.layers.items() if c.type == "Add"}


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (tuple, list)):
        return sum(_numel(v) for v in x)
    return 0


def _closed_form(name: str, m: nn.Module, inputs: tuple, output) -> LayerCost:
    """FLOPs and element counts of one call of ``m`` from the shapes it saw."""
    out_n = _numel(output)
    w_n = sum(p.numel() for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None)
    if isinstance(m, Add) or type(m).__name__ == "Add":
        return LayerCost(name, "Add", float(out_n), _numel(inputs), 0, out_n)
    x = inputs[0]
    # by base class, so subclasses (a "same"-padding Conv2d) and 1-D / 3-D convs are charged like their base;
    # the output's and weight's shapes hold what a subclass's own padding did
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # N·Cin·(in positions)·(Cout/groups)·k
        macs = x.numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    elif isinstance(m, nn.modules.conv._ConvNd):  # N·Cout·(out positions)·(Cin/groups)·k
        macs = output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    elif isinstance(m, nn.Linear):
        macs = (x.numel() // m.in_features) * m.in_features * m.out_features
    else:
        raise ModelError(f"no cost formula for layer {name} of type {type(m).__name__}: "
                         "add one in quantkit/sensitivity/cost_model.py")
    return LayerCost(name, weighted_kind(m), 2.0 * macs, x.numel(), w_n, out_n)


def _op_flops(func, args, out) -> float:
    """FLOPs of a convolution / matmul dispatched outside the quantizable layers; 0 for everything else."""
    name = func.__name__
    if name.startswith("convolution") and isinstance(out, torch.Tensor):
        w = args[1]
        return 2.0 * out.numel() * (w.shape[1] * math.prod(w.shape[2:]))
    if name.startswith(("mm", "addmm", "bmm", "matmul")) and isinstance(out, torch.Tensor):
        a = args[-2] if name.startswith("addmm") else args[0]
        return 2.0 * out.numel() * a.shape[-1]
    return 0.0


def layer_costs(model: nn.Module, example: torch.Tensor, layer_names, spec: DeviceSpec = T4) -> CostTable:
    """Record shapes with one forward of ``example`` (batch = ``example.shape[0]``) and return the cost table.

    ``layer_names``: the quantizable layers (module names, e.g. ``layout.layers``). A layer called several
    times is charged for every call. Raises ModelError for a layer type without a formula.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    names = list(layer_names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UsageError(f"layers {missing[:5]} are not modules of the model: pass names from the layout")
    acc: dict[str, LayerCost] = {}
    depth = [0]
    overhead = [0.0, 0.0]  # flops, bytes at FP16

    class _Overhead(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if depth[0] == 0 and not func.is_view and torch.Tag.pointwise not in func.tags:
                overhead[0] += _op_flops(func, args, out)
                overhead[1] += 2.0 * (_numel(list(args)) + _numel(list((kwargs or {}).values())) + _numel(out))
            return out

    def pre(m, inputs):
        depth[0] += 1

    def make_post(name):
        def post(m, inputs, output):
            depth[0] -= 1
            c = _closed_form(name, m, inputs, output)
            prev = acc.get(name)
            if prev is not None:  # a shared layer pays for each call
                c = LayerCost(name, c.type, prev.flops + c.flops, prev.input_elements + c.input_elements,
                              c.weight_elements, prev.output_elements + c.output_elements)
            acc[name] = c
        return post

    handles = []
    try:
        for n in names:
            handles.append(modules[n].register_forward_pre_hook(pre))
            handles.append(modules[n].register_forward_hook(make_post(n)))
        with torch.no_grad(), _Overhead():
            model(example)
    finally:
        for h in handles:
            h.remove()
    notes = [f"{n}: never called in forward, costed 0" for n in names if n not in acc]
    layers = {n: acc.get(n, LayerCost(n, type(modules[n]).__name__, 0.0, 0, 0, 0)) for n in names}
    return CostTable(layers, overhead[0], overhead[1], int(example.shape[0]), tuple(example.shape), spec, notes)
