"""A Ctrl-C swallowed somewhere inside a run still stops the output folder from being replaced."""

from __future__ import annotations

import os
import signal

import pytest

from quantkit.output import StagedOutput
from quantkit.utils import interrupt


@pytest.fixture
def latch():
    old = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    interrupt.install()
    yield
    interrupt.install()  # clears the request so later tests start clean
    for s, h in old.items():
        signal.signal(s, h)


def _previous(out):
    import hashlib
    import json

    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous")  # a previous quantkit output: its manifest lists every file
    files = {"model.onnx": {"sha256": hashlib.sha256(b"previous").hexdigest(), "size": 8}}
    (out / "manifest.json").write_text(json.dumps({"schema": 1, "files": files}))


def test_swallowed_sigint_blocks_the_commit(tmp_path, latch):
    out = tmp_path / "out"
    _previous(out)
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(out, force=True) as stage:
            stage.write_bytes("model.onnx", b"new")
            try:  # a library that catches the interrupt and carries on
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                pass
            assert interrupt.requested()
    assert (out / "model.onnx").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_without_sigint_the_output_is_committed(tmp_path, latch):
    out = tmp_path / "out"
    _previous(out)
    with StagedOutput(out, force=True) as stage:
        stage.write_bytes("model.onnx", b"new")
    assert not interrupt.requested()
    assert (out / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
