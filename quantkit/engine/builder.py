"""Build a TensorRT engine from a Q/DQ ONNX with the Python API, following a ``BuildPlan``.

tensorrt is imported lazily (``pip install 'quantkit[trt]'`` on the GPU machine); without it, or without a
CUDA GPU, the functions raise DependencyError/EngineError saying why. The code covers the API differences
between TensorRT 8.6, 10.x and 11:

* 8.6 needs the EXPLICIT_BATCH network flag; 10.x made explicit batch the default (flag deprecated), 11
  dropped it. STRONGLY_TYPED is a network-creation flag (9.x+; used from 10.12 here).
* INT8/FP16/OBEY_PRECISION_CONSTRAINTS builder flags exist up to 10.x only (weak typing); 11 removed them.
* Workspace via ``set_memory_pool_limit`` (8.4+); serialized engines via ``build_serialized_network``.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from quantkit.engine.config import BuildPlan, check_target, parse_trt_version
from quantkit.errors import DependencyError, EngineError
from quantkit.utils.atomic import atomic_write_bytes

INSTALL_HINT = "install it on the GPU machine with `pip install 'quantkit[trt]'`, or run build_engine.sh there"
_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR = 75, 76  # CUdevice_attribute values (CUDA driver API)


def import_tensorrt():
    """Import tensorrt or raise DependencyError with the install hint and the reason."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise DependencyError(f"tensorrt is not importable ({exc}): {INSTALL_HINT}") from exc
    except Exception as exc:  # broken installs raise OSError on missing libnvinfer
        raise DependencyError(f"tensorrt failed to import ({type(exc).__name__}: {exc}): {INSTALL_HINT}") from exc
    return trt


def cuda_device(index: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device ``index`` through the driver library; EngineError when absent."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        raise EngineError("no CUDA driver (libcuda) found: a TensorRT build needs an NVIDIA GPU and its driver")
    count, dev = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        raise EngineError(f"no CUDA GPU #{index} visible (cuInit/cuDeviceGetCount failed or {count.value} GPUs); "
                          "check the driver and CUDA_VISIBLE_DEVICES")
    cuda.cuDeviceGet(ctypes.byref(dev), index)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
    return name.value.decode(errors="replace"), (major.value, minor.value)


def network_flags(trt, plan: BuildPlan, installed: tuple[int, ...]) -> int:
    """Network-creation flags for the installed TensorRT (see module docstring)."""
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if installed[0] < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if plan.strongly_typed:
        if not hasattr(creation, "STRONGLY_TYPED"):
            raise EngineError(f"TensorRT {trt.__version__} has no strongly typed networks; upgrade to >= 10.12")
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _configure(trt, builder, network, plan: BuildPlan):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for the inspector
    for flag in plan.flags:
        member = getattr(trt.BuilderFlag, flag.value, None)
        if member is None:
            raise EngineError(f"TensorRT {trt.__version__} has no builder flag {flag.value} (weak typing was "
                              "removed in 11): build the strongly typed FP16 ONNX")
        config.set_flag(member)
    if plan.fp16_layers:
        wanted = set(plan.fp16_layers)
        found = set()
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in wanted:
                layer.precision = trt.float16
                found.add(layer.name)
        missing = sorted(wanted - found)
        if missing:
            raise EngineError(f"fp16_layers {missing} match no TensorRT layer; use ONNX node names of the graph")
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    dynamic = sorted(n for n, shape in inputs.items() if any(d < 0 for d in shape))
    if dynamic and plan.profile is None:
        raise EngineError(f"inputs {dynamic} have dynamic dimensions but the plan has no profile: plan with "
                          "batch='min:opt:max', or export with a static batch")
    for p in plan.profile.inputs if plan.profile is not None else ():
        if p.input_name not in inputs:
            raise EngineError(f"profile input '{p.input_name}' is not a network input {sorted(inputs)}; "
                              "plan with input_name=<the ONNX input name>")
    if plan.profile is not None:
        profile = builder.create_optimization_profile()
        for p in plan.profile.inputs:  # every input of a model with several, same batch range
            profile.set_shape(p.input_name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
    return config


def build_engine(onnx_path: str | os.PathLike, plan: BuildPlan, out_dir: str | os.PathLike,
                 timing_cache: str | os.PathLike | None = None, *, engine_name: str | None = None) -> Path:
    """Build and write ``<out_dir>/<onnx stem>.engine``; load and update ``timing_cache`` when given.

    Checks the GPU against ``plan.target`` and the installed TensorRT against ``plan.trt_version`` (major.minor)
    first. Raises DependencyError (no tensorrt) or EngineError (no GPU, wrong GPU, parse or build failure).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX file {onnx_path} does not exist; export it first")
    trt = import_tensorrt()
    name, cc = cuda_device()
    check_target(plan.target, cc, name)
    installed = parse_trt_version(trt.__version__.split("+")[0])
    if installed[:2] != plan.trt_version[:2]:
        raise EngineError(f"the plan is for TensorRT {'.'.join(map(str, plan.trt_version))} but "
                          f"{trt.__version__} is installed: re-plan with plan_build('{trt.__version__}', ...)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineError("tensorrt.Builder could not be created (no usable GPU or driver mismatch)")
    network = builder.create_network(network_flags(trt, plan, installed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = _configure(trt, builder, network, plan)
    if timing_cache is not None and Path(timing_cache).is_file():
        cache = config.create_timing_cache(Path(timing_cache).read_bytes())
    else:
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {onnx_path.name}; read the TensorRT log above")
    out = Path(out_dir) / (engine_name or f"{onnx_path.stem}.engine")
    atomic_write_bytes(out, bytes(memoryview(serialized)))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return out
