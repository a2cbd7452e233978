"""Errors quote user content bounded: a megabyte tensor name or state_dict key (valid in ONNX and torch files) is
quoted as its first characters plus its length, and every QuantkitError message stays one readable line whose
fix (said last) survives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.errors import DataError, QuantkitError, WeightsError
from quantkit.models.loading import read_state_dict
from quantkit.quote import MESSAGE_LIMIT, QUOTE_LIMIT, bound_message
from onnx_toy import toy_data, toy_onnx

BIG = 1_000_000  # characters of the hostile name: 1 MB (the field saw 50 MB; the bound is the same)


def test_state_dict_key_of_a_megabyte_is_quoted_capped(tmp_path):
    key = "k" * BIG
    torch.save({key: torch.empty(3, device="meta")}, tmp_path / "w.pt")
    with pytest.raises(WeightsError) as e:
        read_state_dict(tmp_path / "w.pt")
    msg = str(e.value)
    assert f"'{'k' * QUOTE_LIMIT}'... ({BIG} chars) is a meta tensor" in msg
    assert len(msg) < 1000 and msg.rstrip().endswith("are loaded or trained")


def test_onnx_node_name_of_a_megabyte_is_quoted_capped_by_the_cli(tmp_path):
    model = onnx.load_from_string(toy_onnx())
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.name = "n" * BIG
    onnx.save(model, tmp_path / "big.onnx")
    np.save(tmp_path / "calib.npy", toy_data(2))
    res = CliRunner().invoke(main, ["export", str(tmp_path / "big.onnx"), "--calib", str(tmp_path / "calib.npy"),
                                    "--skip", "no_such_layer", "--out", str(tmp_path / "o"), "--no-cache"])
    assert res.exit_code == 2, res.output[:2000]
    assert "matches no quantizable layer" in res.output and f"... ({BIG} chars)" in res.output
    assert len(res.output) < 2000 and not (tmp_path / "o").exists()


def test_every_quantkit_error_is_bounded_and_keeps_its_fix():
    one_token = DataError("tensor " + "x" * BIG + " is bad: fix the model")
    assert str(one_token) == f"tensor {'x' * QUOTE_LIMIT}... ({BIG} chars) is bad: fix the model"
    many_words = QuantkitError("names: " + "ab " * BIG + "; rename them")
    text = str(many_words)
    assert len(text) < MESSAGE_LIMIT + 100 and text.startswith("names: ab ab") and text.endswith("; rename them")
    assert "chars left out" in text


@pytest.mark.parametrize("text", ["", "short message", "a/normal/path/" * 20 + " : fix", "é" * 300])
def test_ordinary_messages_are_unchanged(text):
    assert bound_message(text) == text
    assert str(DataError(text)) == text
