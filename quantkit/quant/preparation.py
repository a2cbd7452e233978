"""The quantization stage's entry: reparameterize a model, expose its functional adds, insert quantizers."""

from __future__ import annotations

from torch import nn

from quantkit.quant.attention import split_attention
from quantkit.quant.functional import expose_residual_adds
from quantkit.quant.insert import insert_quantizers
from quantkit.recipe import QuantizationSpec
from quantkit.state import PreparedModel


def prepare(model: nn.Module, spec: QuantizationSpec, info: dict | None = None,
            size: tuple[int, int] | None = None) -> PreparedModel:
    """Reparameterize a copy of ``model`` (QA-RepVGG and Conv+BN fused), expose residual adds as modules and
    insert quantizers for the layers ``spec`` selects (the others keep disabled quantizers: FP16 in TensorRT).

    info: what the report says about the model (name, source, parameters); completed with the deploy-form
    parameter count and layer counts. size: the model's default input (height, width) in pixels, if known.
    """
    from quantkit.reparam.fuse import find_unfused_batchnorms, reparameterize

    info = dict(info or {"name": type(model).__name__, "source": "python",
                         "parameters": sum(p.numel() for p in model.parameters())})
    size = size or getattr(model, "default_input_size", None)
    model.eval()
    fp32 = reparameterize(model, full_fusion=True)  # a copy: what follows never touches the user's model
    if size is not None:
        fp32.default_input_size = tuple(size)
    attention = sum(isinstance(m, nn.MultiheadAttention) for m in fp32.modules())
    attention_notes = split_attention(fp32)  # its projections become nn.Linear layers (quant.attention)
    fp32, notes = expose_residual_adds(fp32)
    if attention > len(attention_notes):
        notes.append(f"{attention - len(attention_notes)} nn.MultiheadAttention module(s) run as four Linear "
                     "projections (q_proj, k_proj, v_proj, out_proj; same weights, same arithmetic) so they can be "
                     "quantized")
    notes.extend(attention_notes)
    unfused = find_unfused_batchnorms(fp32)
    if unfused:
        notes.append(f"{len(unfused)} BatchNorm layer(s) could not be folded: {', '.join(unfused[:10])}")
    qmodel, layout = insert_quantizers(fp32, tuple(spec.quantize), tuple(spec.skip), spec.residual_add)
    layout.notes.extend(notes)
    info.update({
        "parameters_deploy": sum(p.numel() for p in fp32.parameters()),
        "quantizable_layers": len(layout.layers),
        "int8_layers": len(layout.int8),
    })
    return PreparedModel(fp32=fp32, qmodel=qmodel, layout=layout, notes=notes, info=info)
