"""TensorRT build planning, pure Python: which typing mode, flags and shape profile a given TensorRT needs.

    plan = plan_build("10.13.2", onnx_is_strong=True, target="t4", batch="1:8:32", fp16_layers=[])
    write_build_script(out / "build_engine.sh", "model_strong.onnx", plan)   # quantkit.engine.trtexec
    build_engine(out / "model_strong.onnx", plan, out, timing_cache)         # quantkit.engine.builder

Policy (FACTS.md): TensorRT 8.6 .. 10.11 build the FP32 Q/DQ graph with weak typing (INT8 + FP16 flags; layers
we keep in FP16 need OBEY_PRECISION_CONSTRAINTS). From 10.12 a strongly typed build of the FP16 Q/DQ graph is
the way (weak typing is deprecated there, still allowed for the FP32 graph). TensorRT 11 removed weak typing:
only the strongly typed FP16 graph builds.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace

from quantkit.errors import EngineError, UsageError

MIN_TRT = (8, 6)
STRONG_FROM = (10, 12)
WEAK_REMOVED_IN = (11, 0)


class TypingMode(str, enum.Enum):
    STRONG = "strong"  # precisions from the ONNX types (FP16 tensors + Q/DQ)
    WEAK = "weak"  # builder picks per layer among the enabled flags


class BuilderFlagName(str, enum.Enum):
    """Names of tensorrt.BuilderFlag members (resolved by the builder, spelled out for trtexec)."""

    INT8 = "INT8"
    FP16 = "FP16"
    OBEY_PRECISION_CONSTRAINTS = "OBEY_PRECISION_CONSTRAINTS"


@dataclass(frozen=True)
class Target:
    """A deployment GPU: engines are specific to GPU model and TensorRT version."""

    name: str
    compute_capability: tuple[int, int]
    device_token: str  # must appear in the device name (nvidia-smi / cudaGetDeviceProperties)


TARGETS = {"t4": Target("t4", (7, 5), "T4")}
ANY_TARGET = "any"


@dataclass(frozen=True)
class ShapeProfile:
    """One optimization profile: min/opt/max shapes (N, C, H, W for an image) of the input ``input_name``, and of
    the model's further inputs (``others``, one ShapeProfile each, same batch range) when it takes several."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    others: tuple["ShapeProfile", ...] = ()

    @property
    def inputs(self) -> tuple["ShapeProfile", ...]:
        """This input's profile and the others', in graph order."""
        return (self, *self.others)

    def trtexec_args(self) -> list[str]:
        fmt = lambda s: "x".join(str(d) for d in s)  # noqa: E731
        return [f"--{k}Shapes=" + ",".join(f"{p.input_name}:{fmt(getattr(p, k))}" for p in self.inputs)
                for k in ("min", "opt", "max")]


@dataclass(frozen=True)
class EngineConfig:
    """What the user asks for (recipe ``engine:`` section); ``plan_build`` turns it into a ``BuildPlan``."""

    target: str = "t4"
    batch: str | tuple[int, int, int] | None = None  # "1:8:32" -> dynamic batch profile; None = static
    input_name: str = "images"
    chw: tuple[int, int, int] = (3, 640, 640)
    fp16_layers: tuple[str, ...] = ()  # ONNX node names kept in FP16 (weak typing only)
    workspace_mib: int = 4096


@dataclass(frozen=True)
class BuildPlan:
    """Everything the builder and the trtexec script need; derived, never edited by hand."""

    trt_version: tuple[int, ...]
    typing: TypingMode
    flags: tuple[BuilderFlagName, ...]
    target: str
    profile: ShapeProfile | None
    input_name: str
    static_shape: tuple[int, ...] | None
    fp16_layers: tuple[str, ...]
    workspace_mib: int
    notes: tuple[str, ...] = field(default=())

    @property
    def strongly_typed(self) -> bool:
        return self.typing == TypingMode.STRONG


def parse_trt_version(version: str) -> tuple[int, ...]:
    """'10.12.0.36' -> (10, 12, 0, 36); raises UsageError on anything else."""
    if not isinstance(version, str) or not re.fullmatch(r"\d+(\.\d+){0,3}", version.strip()):
        raise UsageError(f"TensorRT version must look like '10.12.0', got {version!r}")
    return tuple(int(p) for p in version.strip().split("."))


def parse_batch(batch: str | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    """'1:8:32' or (1, 8, 32) -> (min, opt, max), with 1 <= min <= opt <= max."""
    if isinstance(batch, str):
        parts = batch.split(":")
        if len(parts) != 3 or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
            raise UsageError(f"batch profile must be 'min:opt:max' with integers, e.g. '1:8:32'; got {batch!r}")
        values = tuple(int(p) for p in parts)
    else:
        values = tuple(batch)
        if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UsageError(f"batch profile must be three integers (min, opt, max); got {batch!r}")
    lo, opt, hi = values
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"batch profile needs 1 <= min <= opt <= max; got {lo}:{opt}:{hi}")
    return lo, opt, hi


def _target(target: str) -> str:
    key = (target or ANY_TARGET).lower()
    if key != ANY_TARGET and key not in TARGETS:
        raise UsageError(f"unknown engine target {target!r}; use one of {sorted(TARGETS) + [ANY_TARGET]}")
    return key


def graph_inputs(model) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-sample shape: the dims after the batch) of each input of ``model`` (an ONNX ModelProto) that is
    not an initializer, in graph order: what :func:`plan_build` takes as ``inputs``."""
    inits = {t.name for t in model.graph.initializer}
    return [(i.name, tuple(int(d.dim_value) for d in i.type.tensor_type.shape.dim[1:]))
            for i in model.graph.input if i.name not in inits]


def plan_build(trt_version: str, onnx_is_strong: bool, target: str = "t4",
               batch: str | tuple[int, int, int] | None = None, fp16_layers: list[str] | tuple[str, ...] = (),
               *, input_name: str = "images", chw: tuple[int, int, int] = (3, 640, 640),
               workspace_mib: int = 4096, inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()) -> BuildPlan:
    """Decide typing mode, builder flags and profile for one TensorRT version.

    ``onnx_is_strong``: the ONNX is the FP16 Q/DQ graph from ``quantkit.exporter.strong``.
    ``batch``: None builds the static shape (1, *chw); 'min:opt:max' builds a dynamic-batch profile.
    ``inputs``: for a model with several inputs, (name, per-sample shape) of each in graph order; the profile then
    gives every input the batch range (``input_name`` / ``chw`` are ignored).
    Raises EngineError when this TensorRT cannot build this ONNX, UsageError on malformed arguments.
    """
    version = parse_trt_version(trt_version)
    key = _target(target)
    notes: list[str] = []
    if version[:2] < MIN_TRT:
        raise EngineError(f"TensorRT {trt_version} is too old: quantkit needs >= 8.6 for Q/DQ ONNX; upgrade")
    if onnx_is_strong:
        if version[:2] < STRONG_FROM:
            raise EngineError(
                f"TensorRT {trt_version} cannot build the strongly typed FP16 ONNX (needs >= 10.12 here); "
                "build the FP32 Q/DQ ONNX with weak typing instead, or upgrade TensorRT")
        typing, flags = TypingMode.STRONG, ()
        if fp16_layers:
            notes.append("fp16_layers ignored: in a strongly typed build the ONNX types decide precision")
        fp16_layers = ()
    else:
        if version[:2] >= WEAK_REMOVED_IN:
            raise EngineError(
                f"TensorRT {trt_version} removed weak typing (INT8/FP16 builder flags): export the strongly typed "
                "FP16 Q/DQ ONNX (quantkit.exporter.strong.to_strongly_typed) and build that")
        typing = TypingMode.WEAK
        flags = (BuilderFlagName.INT8, BuilderFlagName.FP16)
        if fp16_layers:
            flags += (BuilderFlagName.OBEY_PRECISION_CONSTRAINTS,)
        if version[:2] >= STRONG_FROM:
            notes.append(f"weak typing is deprecated in TensorRT {trt_version}; prefer the strongly typed ONNX")
    bad = [n for n in fp16_layers if not n or any(c in n for c in ",:'\n")]
    if bad:
        raise UsageError(f"layer names {bad} cannot be passed to trtexec --layerPrecisions (',', ':' or quotes)")
    if key == ANY_TARGET:
        notes.append("no target GPU check: the engine only runs on the GPU model it is built on")
    shapes = [(n, tuple(c)) for n, c in inputs] if len(inputs) > 1 else [(input_name, tuple(chw))]
    for _, c in shapes:
        if len(c) < 1 or not all(isinstance(d, int) and d > 0 for d in c):  # (C, H, W) images, (L,) audio, ...
            raise UsageError(f"the per-sample input shape must be positive integers, e.g. (C, H, W); got {c!r}")
    input_name, chw = shapes[0]
    profile, static = None, None
    if batch is None:
        static = (1, *chw)
    else:
        lo, opt, hi = parse_batch(batch)
        each = [ShapeProfile(n, (lo, *c), (opt, *c), (hi, *c)) for n, c in shapes]
        profile = replace(each[0], others=tuple(each[1:]))
    return BuildPlan(trt_version=version, typing=typing, flags=tuple(flags), target=key, profile=profile,
                     input_name=input_name, static_shape=static, fp16_layers=tuple(fp16_layers),
                     workspace_mib=int(workspace_mib), notes=tuple(notes))


def plan_from_config(config: EngineConfig, trt_version: str, onnx_is_strong: bool) -> BuildPlan:
    """``plan_build`` with the fields of an ``EngineConfig``."""
    return plan_build(trt_version, onnx_is_strong, config.target, config.batch, config.fp16_layers,
                      input_name=config.input_name, chw=config.chw, workspace_mib=config.workspace_mib)


def check_target(target: str, compute_capability: tuple[int, int], device_name: str) -> None:
    """Refuse to build an engine for ``target`` on another GPU model (engines do not transfer between models).

    ``compute_capability``: (major, minor) of the build GPU; ``device_name``: e.g. 'Tesla T4'.
    """
    key = _target(target)
    if key == ANY_TARGET:
        return
    want = TARGETS[key]
    cc = tuple(compute_capability)
    if cc != want.compute_capability or want.device_token.lower() not in device_name.lower():
        raise EngineError(
            f"engine target '{key}' needs an NVIDIA {want.device_token} (compute capability "
            f"{want.compute_capability[0]}.{want.compute_capability[1]}), but this GPU is '{device_name}' "
            f"(compute capability {cc[0]}.{cc[1]}). TensorRT engines only run on the GPU model they were built on: "
            "run build_engine.sh on the T4 machine, or pass target='any' to build for this GPU")
