"""The engine stage's entries for an export folder: ``build_engine.sh`` for the target GPU, the TensorRT
engine itself when TensorRT and a suitable GPU are here, and the fail-fast check before calibration."""

from __future__ import annotations

from quantkit import paths
from quantkit.recipe import Recipe
from quantkit.state import Graphs, PreparedModel



def check_possible(recipe: Recipe) -> None:
    """Fail fast (before calibrating) when ``export.engine`` cannot work here: no TensorRT, no GPU, wrong GPU."""
    if not recipe.export.engine:
        return
    from quantkit.engine.builder import cuda_device, import_tensorrt
    from quantkit.engine.config import check_target

    import_tensorrt()
    name, cc = cuda_device()
    check_target(recipe.export.target, cc, name)


def write_calibration_cache(stage, int8_model) -> None:
    """``calibration.cache``: the INT8 graph's activation scales in TensorRT's text format, for teams still on
    implicit INT8 (TensorRT 8.6 .. 10.x); ``--trt-calib-cache`` reads it back on the ONNX route."""
    from quantkit.calibrate.trt_cache import cache_text_for

    stage.write_text("calibration.cache", cache_text_for(int8_model))


def fp16_nodes(graphs: Graphs, model: PreparedModel) -> list[str]:
    """ONNX node names of the weighted layers kept out of INT8 (weak typing pins them to FP16)."""
    from quantkit.engine.inspect import onnx_nodes_for_modules
    from quantkit.quant.registry import weighted_kind

    layout = model.layout
    subs = dict(model.qmodel.named_modules())
    modules = [n for n in layout.layers if n not in layout.int8 and n in subs and weighted_kind(subs[n])]
    return sorted(onnx_nodes_for_modules(graphs.int8, modules).values())


def write_build_script(stage, recipe: Recipe, graphs: Graphs, model: PreparedModel,
                       batch: tuple[int, int, int]) -> None:
    """Write ``build_engine.sh``: the strongly typed build for TensorRT >= 10.12, ``--int8 --fp16`` with FP16
    layer constraints for 8.6 .. 10.11, for ``recipe.export.target``. ``batch``: (min, opt, max)."""
    from quantkit.engine.config import plan_build
    from quantkit.engine.dispatch import write_dispatch_script

    graphs.fp16_nodes = fp16_nodes(graphs, model)
    dyn = None if batch[0] == batch[2] else batch
    chw = tuple(int(d) for d in graphs.refs.batches[0].shape[1:])
    weak_plan = plan_build("10.0", onnx_is_strong=False, target=recipe.export.target, batch=dyn,
                           fp16_layers=graphs.fp16_nodes, chw=chw)
    strong_plan = (plan_build("10.12", onnx_is_strong=True, target=recipe.export.target, batch=dyn, chw=chw)
                   if graphs.strong is not None else None)
    write_dispatch_script(stage.path("build_engine.sh"), weak_plan, strong_plan, weak_onnx=graphs.weak_name,
                          strong_onnx=graphs.strong_name)
    stage.files["build_engine.sh"] = stage.path("build_engine.sh")


def build_here(stage, recipe: Recipe, graphs: Graphs, batch: tuple[int, int, int]) -> dict:
    """Build ``model.engine`` with the installed TensorRT (strongly typed from 10.12) into ``stage`` and
    inspect its layer precisions. Raises DependencyError/EngineError without TensorRT or a suitable GPU."""
    return build_engine_files(stage, recipe, strong_written=graphs.strong is not None, fp16_nodes=graphs.fp16_nodes,
                              batch=batch)


def build_engine_files(stage, recipe: Recipe, *, strong_written: bool, fp16_nodes, batch: tuple[int, int, int],
                       weak_onnx: str = "model.int8.onnx", strong_onnx: str = "model.int8.strong.onnx") -> dict:
    """``--engine`` on either route: build ``model.engine`` from the staged ``strong_onnx`` (TensorRT >= 10.12,
    when written) or ``weak_onnx`` (``fp16_nodes`` pinned to FP16), write ``engine.layers.json``, and return the
    build's information for the report. ``batch``: (min, opt, max)."""
    from quantkit.engine.local import build_and_inspect, installed_trt_version, prefers_strong

    dyn = None if batch[0] == batch[2] else batch
    use_strong = strong_written and prefers_strong(installed_trt_version())
    onnx_name = strong_onnx if use_strong else weak_onnx
    info = build_and_inspect(stage.path(onnx_name), stage.staging, target=recipe.export.target, batch=dyn,
                             fp16_nodes=fp16_nodes, timing_cache=paths.cache_dir() / "trt-timing.cache",
                             engine_name="model.engine")
    stage.files["model.engine"] = info.pop("engine")
    stage.files["engine.layers.json"] = stage.path("engine.layers.json")
    return info
