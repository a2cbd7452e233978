"""The engine stage's entries for an export folder, through the backend ``export.backend`` names
(``engine.backend``; TensorRT by default): its build scripts (``build_engine.sh`` for the target GPU), the engine
itself with ``--engine``, and the fail-fast check before calibration."""

from __future__ import annotations

from quantkit.recipe import Recipe
from quantkit.state import Graphs, PreparedModel



def check_possible(recipe: Recipe) -> None:
    """Fail fast (before calibrating): an unknown ``export.backend``, or ``export.engine`` that cannot work here
    (TensorRT: no TensorRT, no GPU, wrong GPU)."""
    from quantkit.engine.backend import get_backend

    get_backend(recipe.export.backend).check_possible(recipe)


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


def torch_route_request(graphs: Graphs, model: PreparedModel, batch: tuple[int, int, int]):
    """The torch route's ``engine.backend.BuildRequest`` (``graphs`` and ``model`` are read, not changed)."""
    from quantkit.engine.backend import BuildRequest
    from quantkit.engine.config import graph_inputs

    nodes = fp16_nodes(graphs, model)
    inputs = graph_inputs(graphs.int8)
    several = len(inputs) > 1  # named inputs (.npz): each its own shape in the profile
    return BuildRequest(weak_onnx=graphs.weak_name,
                        strong_onnx=graphs.strong_name if graphs.strong is not None else None,
                        fp16_nodes=tuple(nodes), batch=tuple(batch),
                        sample_shape=(inputs[0][1] if several
                                      else tuple(int(d) for d in graphs.refs.batches[0].shape[1:])),
                        input_name=inputs[0][0] if several else "images", inputs=tuple(inputs) if several else ())


def write_build_script(stage, recipe: Recipe, graphs: Graphs, model: PreparedModel,
                       batch: tuple[int, int, int]) -> None:
    """The backend's build scripts for this export (TensorRT: ``build_engine.sh``, the strongly typed build for
    TensorRT >= 10.12, ``--int8 --fp16`` with FP16 layer constraints for 8.6 .. 10.11, for ``recipe.export.target``).
    ``batch``: (min, opt, max)."""
    from quantkit.engine.backend import get_backend

    get_backend(recipe.export.backend).write_scripts(stage, recipe, torch_route_request(graphs, model, batch))


def build_here(stage, recipe: Recipe, graphs: Graphs, model: PreparedModel, batch: tuple[int, int, int]) -> dict:
    """``--engine`` on the torch route: the backend's build into ``stage`` (TensorRT: ``model.engine``, strongly
    typed from 10.12, and its layer precisions). Raises DependencyError/EngineError without TensorRT or a GPU."""
    return build_engine_files(stage, recipe, strong_written=graphs.strong is not None,
                              fp16_nodes=fp16_nodes(graphs, model),
                              batch=batch)


def build_engine_files(stage, recipe: Recipe, *, strong_written: bool, fp16_nodes, batch: tuple[int, int, int],
                       weak_onnx: str = "model.int8.onnx", strong_onnx: str = "model.int8.strong.onnx") -> dict:
    """``--engine`` on either route: the backend's ``build`` from the staged graphs (TensorRT: ``strong_onnx``
    with TensorRT >= 10.12 when written, else ``weak_onnx`` with ``fp16_nodes`` pinned to FP16; writes
    ``model.engine`` and ``engine.layers.json``); returns the build's information for the report."""
    from quantkit.engine.backend import BuildRequest, get_backend

    req = BuildRequest(weak_onnx=weak_onnx, strong_onnx=strong_onnx if strong_written else None,
                       fp16_nodes=tuple(fp16_nodes), batch=tuple(batch), sample_shape=())
    return get_backend(recipe.export.backend).build(stage, recipe, req)
