"""Is onnxconverter-common's float16 converter usable for quantkit's strongly typed (FP16 + Q/DQ) variant?

Runs ``onnxconverter_common.float16.convert_float_to_float16`` (1.16.0, pure Python) on an exported
``model.int8.onnx`` (opset raised to 19 first, as QuantizeLinear-19 is the first to take FP16 scales) and
compares it with quantkit's own pass (``quantkit.exporter.strong``): Q/DQ nodes kept, scale dtypes, scales
outside FP16's normal range, Cast nodes added, ``lint(strong=True)`` errors, and SQNR (dB) against the FP32
graph on the bundled calibration tiles in onnxruntime.

    pip install --target /tmp/occ --no-deps onnxconverter-common==1.16.0
    quantkit export --out /tmp/x          # the bundled detector
    PYTHONPATH=/tmp/occ:. python benchmarks/fp16_converter_trial.py /tmp/x
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, version_converter

from quantkit.data.images import list_images, load_image
from quantkit.data.preprocess import Preprocess, preprocess_image
from quantkit.sqnr import sqnr_db
from quantkit.exporter import parity
from quantkit.exporter.lint import FP16_MIN_NORMAL, lint
from quantkit.exporter.strong import to_strongly_typed
from quantkit.paths import BUNDLED_CALIBRATION


def describe(name: str, m: onnx.ModelProto, fp32_out: list[np.ndarray], x: np.ndarray) -> None:
    ops = Counter(n.op_type for n in m.graph.node)
    inits = {i.name: i for i in m.graph.initializer}
    scale_types, small = Counter(), 0
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits:
            t = inits[n.input[1]]
            scale_types[TensorProto.DataType.Name(t.data_type)] += 1
            v = numpy_helper.to_array(t).astype(np.float64)
            small += int((np.abs(v) < FP16_MIN_NORMAL).sum())
    errors = [f for f in lint(m, strong=True) if f.severity == "error"]
    print(f"{name}: opset {m.opset_import[0].version}; Q {ops['QuantizeLinear']} DQ {ops['DequantizeLinear']} "
          f"Cast {ops['Cast']}; scale dtypes {dict(scale_types)}; scale values < FP16 min normal: {small}; "
          f"lint --strong errors {len(errors)}" + (f" (first: {errors[0].message})" if errors else ""))
    try:
        out = parity.run_session(parity.session(m.SerializeToString()), x)
    except Exception as exc:  # noqa: BLE001 - report why onnxruntime refuses the graph
        print(f"  onnxruntime cannot run it: {type(exc).__name__}: {str(exc)[:300]}")
        return
    print("  SQNR vs FP32 graph (dB): " + ", ".join(f"{sqnr_db(r, o):.2f}" for r, o in zip(fp32_out, out)))


def main(folder: str) -> None:
    from onnxconverter_common.float16 import convert_float_to_float16

    d = Path(folder)
    int8 = onnx.load(d / "model.int8.onnx")
    pp = Preprocess(size=(320, 320))
    x = np.stack([preprocess_image(load_image(f), pp)[0] for f in list_images(BUNDLED_CALIBRATION)[:8]])
    fp32_out = parity.run_session(parity.session((d / "model.onnx").read_bytes()), x)
    describe("weak INT8 (reference)", int8, fp32_out, x)
    describe("quantkit strong pass", to_strongly_typed(int8), fp32_out, x)
    for opset in (17, 19):
        src = int8 if opset == 17 else version_converter.convert_version(int8, 19)
        try:
            conv = convert_float_to_float16(src, keep_io_types=True)
        except Exception as exc:  # noqa: BLE001
            print(f"onnxconverter-common at opset {opset}: raised {type(exc).__name__}: {exc}")
            continue
        describe(f"onnxconverter-common 1.16.0 at opset {opset}", conv, fp32_out, x)
        if opset == 19:  # its Casts to float keep to=FLOAT while their outputs are retyped float16: patch them
            typed = {v.name: v.type.tensor_type.elem_type for v in [*conv.graph.value_info, *conv.graph.output]}
            patched = 0
            for n in conv.graph.node:
                to = next((a for a in n.attribute if a.name == "to"), None)
                if n.op_type == "Cast" and to.i == TensorProto.FLOAT and typed.get(n.output[0]) == TensorProto.FLOAT16:
                    to.i = TensorProto.FLOAT16
                    patched += 1
            describe(f"  ... with {patched} Cast(to=FLOAT) patched to FLOAT16 by hand", conv, fp32_out, x)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out")
