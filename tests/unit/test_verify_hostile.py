"""`quantkit verify` judges only what is inside the folder, and malformed manifests are findings, not
tracebacks; `quantkit lint` refuses files that are not ONNX."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from quantkit.errors import UsageError
from quantkit.exporter.lint import load_for_lint
from quantkit.report.manifest import verify


def folder_with(tmp_path, files=None, manifest=None):
    d = tmp_path / "out"
    d.mkdir()
    files = files if files is not None else {"model.onnx": b"graph"}
    for n, b in files.items():
        (d / n).write_bytes(b)
    if manifest is None:
        manifest = {"schema": 1, "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                                           for n, b in files.items()}}
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (d / "manifest.json").write_bytes(data)
    return d


def test_intact_folder_has_no_problems(tmp_path):
    assert verify(folder_with(tmp_path)) == []


@pytest.mark.parametrize("manifest", [{"files": ["model.onnx"]}, {"files": {"model.onnx": None}}, {"files": None},
                                      [1], {"files": {"model.onnx": {"sha256": 1, "size": "5"}}},
                                      b"\xff\xfe{}", b"[" * 100_000])
def test_malformed_manifest_is_one_problem(tmp_path, manifest):
    problems = verify(folder_with(tmp_path, manifest=manifest))
    assert len(problems) == 1 and "manifest.json" in problems[0], problems


def test_paths_outside_the_folder_are_not_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside")
    m = {"files": {"../secret.txt": {"sha256": hashlib.sha256(b"outside").hexdigest(), "size": 7},
                   "/etc/hostname": {"sha256": "0", "size": 1}}}
    problems = verify(folder_with(tmp_path, files={}, manifest=m))
    assert len(problems) == 2 and all("not a plain file name" in p for p in problems), problems


def test_extra_files_anywhere_are_flagged(tmp_path):
    d = folder_with(tmp_path)
    (d / ".hidden").write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "sub" / "payload.onnx").write_bytes(b"x")
    (d / "empty").mkdir()
    (d / "link").symlink_to(tmp_path)
    problems = verify(d)
    assert sorted(p.split(":")[0] for p in problems) == [".hidden", "empty/", "link", "sub/payload.onnx"], problems


def test_no_manifest_is_a_usage_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UsageError, match="no manifest.json"):
        verify(tmp_path / "x")


@pytest.mark.parametrize("content", [b"", b"hello, not onnx", b"\x08\x07"])
def test_lint_refuses_non_onnx(tmp_path, content):
    p = tmp_path / "m.onnx"
    p.write_bytes(content)
    with pytest.raises(UsageError, match="empty|not an ONNX model|cannot read"):
        load_for_lint(p)


def test_cli_exit_codes(tmp_path):
    bad = folder_with(tmp_path, manifest={"files": ["model.onnx"]})
    (tmp_path / "empty.onnx").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for args, code, text in ((["verify", str(bad)], 4, "malformed"), (["lint", str(tmp_path / "empty.onnx")], 2, "empty")):
        res = subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, env=env)
        assert res.returncode == code and text in res.stderr and "Traceback" not in res.stderr, res.stderr
