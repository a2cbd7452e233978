"""``quantkit eval OUT`` on an export made from an FP32 ONNX file: score the folder's model.onnx and
model.int8.onnx in onnxruntime on held-out data. There is no torch model on that route, so the FP32 torch row
says so instead of holding a number. Only the folder's ONNX files (data) are read: no code is imported or run.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from quantkit.data.preprocess import Preprocess
from quantkit.errors import UsageError
from quantkit.eval.held_out import evaluate_export
from quantkit.eval.plan import open_evaluation

GRAPHS = ("model.onnx", "model.int8.onnx")


def _input_size(model_path: Path, fallback) -> tuple[int, int]:
    """(height, width) in pixels of the first graph input of ``model_path``; ``fallback`` (the recipe's
    input.size) for free dims. UsageError when neither gives it, or the file is no ONNX model."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise UsageError(f"{model_path} is not a readable ONNX model ({type(exc).__name__}): re-run the "
                         "export") from exc
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    hw = [d.dim_value for d in dims[2:4]] if len(dims) == 4 else []
    if len(hw) == 2 and all(v > 0 for v in hw):
        return int(hw[0]), int(hw[1])
    if fallback:
        return int(fallback[0]), int(fallback[1])
    raise UsageError(f"{model_path} has no fixed NCHW input size and the folder's recipe sets no input.size: "
                     "pass the size with --set input.size=[H, W] at export time")


def evaluate_onnx_folder(folder: str | Path, recipe, data_path: str, max_images: int = 0, *,
                         progress: bool = True, threads: int | None = None) -> dict:
    """mAP of ``folder``'s model.onnx and model.int8.onnx on ``data_path`` (COCO folder, images + annotations,
    or dataset YAML, as ``recipe.evaluation`` describes it), letterboxed per ``recipe.preprocess`` at the graph's
    input size. Returns the report's ``evaluation`` section (``fp32_torch``: None values and a note)."""
    folder = Path(folder)
    missing = [g for g in GRAPHS if not (folder / g).is_file()]
    if missing:
        raise UsageError(f"{folder} lacks {', '.join(missing)}: pass the --out folder of a finished export")
    pp = Preprocess.at_size(recipe.preprocess, _input_size(folder / "model.onnx", recipe.input.size))
    dataset = open_evaluation(recipe, data_path, max_images)
    return evaluate_export(dataset, recipe, pp, None, str(folder / "model.onnx"), str(folder / "model.int8.onnx"),
                           source=data_path, progress=progress, threads=threads)
