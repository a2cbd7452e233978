"""What a deployment engineer does with an export folder next: build the engine on the target GPU, re-check the
artifacts, score again. Commands are written relative to the export folder (``cd`` into it first), so the
report stays byte-identical wherever the folder is written or copied."""

from __future__ import annotations


def next_steps(*, target: str, files: list[str], has_eval: bool) -> list[dict]:
    """One entry per step: ``what`` it is for and the ``command`` to run from inside the export folder.

    target: the TensorRT target GPU (``export.target``, e.g. ``t4``); files: the artifact names written;
    has_eval: whether held-out data was scored (then ``quantkit eval`` repeats that scoring)."""
    steps = []
    if "build_engine.sh" in files:
        steps.append({"what": f"build the TensorRT engine on the {target.upper()} machine (picks weak or strong "
                              "typing from the installed TensorRT; TRTEXEC=/path/to/trtexec if it is not on PATH)",
                      "command": "bash build_engine.sh"})
    onnx = "model.int8.strong.onnx" if "model.int8.strong.onnx" in files else "model.int8.onnx"
    steps.append({"what": f"or build it with quantkit where TensorRT and a {target.upper()} are present",
                  "command": f"quantkit build {onnx} --target {target}"})
    steps.append({"what": "check that every artifact still matches manifest.json (after copying the folder)",
                  "command": "quantkit verify ."})
    steps.append({"what": "check the INT8 graph's Q/DQ placement against TensorRT's rules",
                  "command": "quantkit lint model.int8.onnx"})
    if has_eval:
        steps.append({"what": "score FP32 and INT8 again on held-out data", "command": "quantkit eval ."})
    return steps
