"""Make the batch dimension of an exported graph symbolic, for a TensorRT min:opt:max batch profile.

A graph traced at batch 1 carries that 1 in its I/O shapes and sometimes in Reshape targets; the first is
rewritten here, the second is refused with the node named (re-export with a -1/0 batch in the reshape).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from quantkit.errors import ExportError
from quantkit.exporter.graph import GraphIndex
from quantkit.exporter.lint import node_label
from quantkit.quote import qcap


def make_batch_dynamic(model: onnx.ModelProto, dim_name: str = "batch") -> onnx.ModelProto:
    """Return a copy whose graph inputs/outputs have dim 0 = ``dim_name``; stale value_info is dropped.

    Raises ExportError when a Reshape hard-codes the traced batch size (its shape constant starts with a
    positive number equal to the traced batch), since that graph would fail at any other batch.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    traced = {vi.type.tensor_type.shape.dim[0].dim_value for vi in graph.input
              if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_value")}
    index = GraphIndex(model)
    for node in index.nodes:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = index.const(node.input[1])
        if shape is not None and shape.size and int(np.ravel(shape)[0]) in traced and int(np.ravel(shape)[0]) > 0:
            raise ExportError(f"Reshape {qcap(node_label(node))} hard-codes batch {int(np.ravel(shape)[0])} in "
                              f"{np.ravel(shape).tolist()}; export with a -1 (or 0) batch dimension in the reshape")
    for vi in [*graph.input, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = dim_name
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model
