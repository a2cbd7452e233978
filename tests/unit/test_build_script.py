"""build_engine.sh: the trtexec line it runs for each TensorRT version, checked with stub trtexec/nvidia-smi."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from quantkit.engine.config import plan_build
from quantkit.engine.dispatch import render_dispatch_script, write_dispatch_script


def _stub(folder: Path, name: str, body: str) -> None:
    p = folder / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def _run(tmp_path, banner: str, gpu: str = "Tesla T4", mode: str | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir, "nvidia-smi", f'echo "{gpu}"\n')
    _stub(bin_dir, "trtexec", f'if [ "${{1:-}}" = --help ]; then echo "&&&& RUNNING {banner} # trtexec --help"; '
                              f'exit 0; fi\necho "$@" > "{tmp_path}/args"\n')
    weak = plan_build("10.0", onnx_is_strong=False, target="t4", fp16_layers=["/heads/head1/cls_pred/Conv"],
                      chw=(3, 320, 320))
    strong = plan_build("10.12", onnx_is_strong=True, target="t4", chw=(3, 320, 320))
    script = tmp_path / "build_engine.sh"
    write_dispatch_script(script, weak, strong)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    if mode:
        env["MODE"] = mode
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    args = (tmp_path / "args").read_text() if (tmp_path / "args").exists() else ""
    return res, args


@pytest.mark.parametrize("banner,expect_strong", [("TensorRT.trtexec [TensorRT v8601]", False),
                                                  ("TensorRT.trtexec [TensorRT v100300]", False),
                                                  ("TensorRT.trtexec [TensorRT v101200]", True),
                                                  ("TensorRT.trtexec [TensorRT v110000]", True)])
def test_version_picks_typing(tmp_path, banner, expect_strong):
    res, args = _run(tmp_path, banner)
    assert res.returncode == 0, res.stderr
    if expect_strong:
        assert "--onnx=model.int8.strong.onnx" in args and "--stronglyTyped" in args and "--int8" not in args
    else:
        assert "--onnx=model.int8.onnx" in args and "--int8 --fp16" in args and "--stronglyTyped" not in args
        assert "--layerPrecisions=/heads/head1/cls_pred/Conv:fp16" in args
        assert "--precisionConstraints=obey" in args
    assert "--saveEngine=model.engine" in args and "--timingCacheFile=timing.cache" in args


def test_refuses_other_gpu_and_honours_mode(tmp_path):
    res, args = _run(tmp_path, "[TensorRT v101200]", gpu="NVIDIA A10G")
    assert res.returncode == 1 and "T4" in res.stderr and not args
    res, args = _run(tmp_path, "[TensorRT v101200]", mode="weak")
    assert res.returncode == 0 and "--int8" in args


def test_dynamic_batch_profile_and_determinism(tmp_path):
    weak = plan_build("10.0", onnx_is_strong=False, target="t4", batch=(1, 8, 32), chw=(3, 320, 320))
    text = render_dispatch_script(weak, None)
    assert "--minShapes=images:1x3x320x320" in text and "--maxShapes=images:32x3x320x320" in text
    assert text == render_dispatch_script(weak, None)
    assert "no strongly typed ONNX" in text
