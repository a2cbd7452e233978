"""Deployment backends: what turns an export folder's Q/DQ graphs into something that runs on the target.

Both routes (``pipeline.export_state`` for a torch module, ``pipeline_onnx.run_onnx_export`` for an FP32 ONNX)
hand the backend named by ``export.backend`` (default ``tensorrt``) the same :class:`BuildRequest` and call, in
this order:

* :meth:`Backend.check_possible` before calibrating (``--engine`` asked for a build here: fail fast when it
  cannot happen on this machine);
* :meth:`Backend.write_scripts` for every export (TensorRT: ``build_engine.sh`` for the target GPU);
* :meth:`Backend.build` with ``--engine`` (TensorRT: ``model.engine`` and ``engine.layers.json``), whose dict
  goes into report.json ``engine``.

A backend writes only through ``stage`` (``stage.path(name)`` + ``stage.files[name] = path``, or
``stage.write_text`` / ``stage.write_bytes``), so its files are part of the atomic output folder and its
manifest. Add one with :func:`register_backend` (docs/architecture.md shows a minimal one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from quantkit.errors import UsageError


@dataclass(frozen=True)
class BuildRequest:
    """What a route hands the backend. File names are relative to the staging folder.

    weak_onnx: the weakly typed Q/DQ graph (FP32 + Q/DQ), or its NMS variant. strong_onnx: the strongly typed FP16
    graph when written, else None. fp16_nodes: ONNX names of weighted nodes kept out of INT8. batch: (min, opt,
    max) batch sizes. sample_shape: one input sample's shape (C, H, W for images; empty for ``build``, which reads it
    from the graph). input_name: the graph input. inputs: for a model with several inputs, (name, per-sample shape)
    of each in graph order (then ``input_name`` / ``sample_shape`` are the first's).
    """

    weak_onnx: str
    strong_onnx: str | None
    fp16_nodes: tuple[str, ...]
    batch: tuple[int, int, int]
    sample_shape: tuple[int, ...]
    input_name: str = "images"
    inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def dynamic_batch(self) -> tuple[int, int, int] | None:
        return None if self.batch[0] == self.batch[2] else self.batch


@runtime_checkable
class Backend(Protocol):
    name: str

    def check_possible(self, recipe) -> None:
        """Raise a QuantkitError naming the fix when ``recipe.export.engine`` cannot build here."""

    def write_scripts(self, stage, recipe, req: BuildRequest) -> None:
        """Write what builds the deployment artifact elsewhere (every export)."""

    def build(self, stage, recipe, req: BuildRequest) -> dict:
        """Build the deployment artifact into ``stage`` (``--engine``); returns report.json ``engine``."""


class TensorRTBackend:
    """TensorRT (the default): ``build_engine.sh`` per TensorRT version and target GPU, and the lazy builder."""

    name = "tensorrt"

    def check_possible(self, recipe) -> None:
        if not recipe.export.engine:
            return
        from quantkit.engine.builder import cuda_device, import_tensorrt
        from quantkit.engine.config import check_target

        import_tensorrt()
        name, cc = cuda_device()
        check_target(recipe.export.target, cc, name)

    def write_scripts(self, stage, recipe, req: BuildRequest) -> None:
        from quantkit.engine.config import plan_build
        from quantkit.engine.dispatch import write_dispatch_script

        common = {"target": recipe.export.target, "batch": req.dynamic_batch, "input_name": req.input_name,
                  "chw": tuple(req.sample_shape), "inputs": tuple(req.inputs)}
        weak = plan_build("10.0", onnx_is_strong=False, fp16_layers=list(req.fp16_nodes), **common)
        strong = plan_build("10.12", onnx_is_strong=True, **common) if req.strong_onnx else None
        write_dispatch_script(stage.path("build_engine.sh"), weak, strong, weak_onnx=req.weak_onnx,
                              strong_onnx=req.strong_onnx or "model.int8.strong.onnx")
        stage.files["build_engine.sh"] = stage.path("build_engine.sh")

    def build(self, stage, recipe, req: BuildRequest) -> dict:
        from quantkit import paths
        from quantkit.engine.local import build_and_inspect, installed_trt_version, prefers_strong

        use_strong = req.strong_onnx is not None and prefers_strong(installed_trt_version())
        info = build_and_inspect(stage.path(req.strong_onnx if use_strong else req.weak_onnx), stage.staging,
                                 target=recipe.export.target, batch=req.dynamic_batch, fp16_nodes=req.fp16_nodes,
                                 timing_cache=paths.cache_dir() / "trt-timing.cache", engine_name="model.engine")
        stage.files["model.engine"] = info.pop("engine")
        stage.files["engine.layers.json"] = stage.path("engine.layers.json")
        return info


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable as ``export.backend: <backend.name>`` (replaces one of the same name)."""
    if not isinstance(backend, Backend) or not isinstance(getattr(backend, "name", None), str):
        raise TypeError("a backend needs a str `name` and check_possible / write_scripts / build methods")
    _BACKENDS[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (UsageError listing the registered ones otherwise)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown export.backend {name!r}: one of {', '.join(sorted(_BACKENDS))} "
                         "(register others with quantkit.engine.backend.register_backend)") from None


def backends() -> list[str]:
    return sorted(_BACKENDS)


register_backend(TensorRTBackend())

__all__ = ["Backend", "BuildRequest", "TensorRTBackend", "register_backend", "get_backend", "backends"]
