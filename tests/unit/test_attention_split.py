"""nn.MultiheadAttention as four Linear projections (quant.attention.SplitAttention), so attention layers are
quantized (calibration failed: "no data was collected for ... out_proj"). Oracle: torch's own module, on every
option the split form accepts; then a transformer-encoder model exported end to end and checked in onnxruntime
against the unmodified torch model."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from quantkit.cli import main
from quantkit.quant.attention import SplitAttention, split_attention


def _mha(batch_first: bool, kdim=None, vdim=None, bias=True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m


CASES = {
    "self, seq-first": dict(),
    "self, batch-first, head weights": dict(batch_first=True, need_weights=True, average_attn_weights=False),
    "kdim/vdim": dict(kdim=8, vdim=12),
    "no bias": dict(bias=False),
    "bool attn_mask 2-D": dict(attn_mask="bool2"),
    "float attn_mask 3-D": dict(attn_mask="float3"),
    "key padding": dict(key_padding_mask=True),
    "causal": dict(is_causal=True),
    "unbatched": dict(unbatched=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_split_attention_computes_what_torch_computes(case):
    c = dict(CASES[case])
    bf = c.pop("batch_first", False)
    m = _mha(bf, c.pop("kdim", None), c.pop("vdim", None), c.pop("bias", True))
    split = SplitAttention(m).eval()
    n, lq, lk = 3, 5, 7
    g = torch.Generator().manual_seed(1)
    q = torch.randn(n, lq, 16, generator=g)
    k = torch.randn(n, lk, m.kdim, generator=g)
    v = torch.randn(n, lk, m.vdim, generator=g)
    if c.get("is_causal"):
        k, v = torch.randn(n, lq, m.kdim, generator=g), torch.randn(n, lq, m.vdim, generator=g)
        lk = lq
    if not bf:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    kw = {"need_weights": c.get("need_weights", True), "average_attn_weights": c.get("average_attn_weights", True)}
    if c.get("attn_mask") == "bool2":
        kw["attn_mask"] = torch.rand(lq, lk, generator=g) > 0.7
        kw["attn_mask"][:, 0] = False  # no row fully masked
    elif c.get("attn_mask") == "float3":
        kw["attn_mask"] = torch.randn(n * 4, lq, lk, generator=g)
    if c.get("key_padding_mask"):
        kw["key_padding_mask"] = torch.zeros(n, lk, dtype=torch.bool)
        kw["key_padding_mask"][:, -2:] = True
    if c.get("is_causal"):
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(lq)
        kw["is_causal"] = True
    if c.get("unbatched"):
        q, k, v = q[:, 0] if not bf else q[0], k[:, 0] if not bf else k[0], v[:, 0] if not bf else v[0]
    with torch.no_grad():
        want, want_w = m(q, k, v, **kw)
        got, got_w = split(q, k, v, **kw)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        assert got_w.shape == want_w.shape and torch.allclose(got_w, want_w, atol=1e-6)


def test_split_attention_replaces_modules_and_keeps_unsupported_ones():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), nn.Linear(16, 2)).eval()
    odd = nn.MultiheadAttention(16, 4, add_bias_kv=True)
    model.add_module("odd", odd)
    notes = split_attention(model)
    assert isinstance(model[0].self_attn, SplitAttention) and model.odd is odd
    assert len(notes) == 1 and "add_bias_kv" in notes[0]


NET = '''
import torch
from torch import nn


class Encoder(nn.Module):
    """Patch embedding, two torch TransformerEncoderLayers (eval fast path in torch), a classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 32, 8, stride=8)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.enc(t).mean(1))


def build():
    return Encoder().eval()
'''


def test_transformer_encoder_exports_with_int8_attention_projections(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.random((32, 3, 32, 32), dtype=np.float32))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["export", f"{tmp_path / 'net.py'}:build", "--calib", str(tmp_path / "calib.npy"),
                                    "--out", str(out), "--no-cache", "--full-int8", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r["precision"] for r in report["layers"]}
    for i in range(2):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert rows[f"enc.layers.{i}.self_attn.{p}"] == "int8"
    assert report["int8_mac_share"]["share"] == 1.0
    import importlib.util

    spec = importlib.util.spec_from_file_location("qk_attn_net", tmp_path / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    held = rng.random((6, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = mod.build()(torch.from_numpy(held)).numpy()  # torch's own attention (its fused eval path)

    def run(name):
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"images": held[i:i + 1]})[0] for i in range(len(held))])

    def sqnr(a, b):
        return 10 * math.log10(float(np.sum(a.astype(np.float64) ** 2) / np.sum((a - b).astype(np.float64) ** 2)))

    assert sqnr(ref, run("model.onnx")) > 80
    assert sqnr(ref, run("model.int8.onnx")) > 25
