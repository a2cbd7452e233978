"""Calibration cache: hits, misses per component, and files that must not be trusted."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from quantkit.calibrate.cache import CalibrationCache, cache_key, component_digests, explain_key
from quantkit.calibrate.histogram import HistogramCollector
from quantkit.errors import UsageError

COMPONENTS = {
    "weights_sha256": hashlib.sha256(b"fake weights").hexdigest(),
    "calib_data": b"\x00\x01image-bytes",
    "num_batches": 32,
    "percentile": 99.99,
    "recipe": {"method": "entropy", "num_bins": 2048, "skip": ["head.cls"]},
}


def _payload() -> dict:
    col = HistogramCollector("backbone.stem")
    col.collect(torch.randn(10_000, generator=torch.Generator().manual_seed(0)))
    return {"tensors": {"backbone.stem": col.state_dict()}, "amax": {"backbone.stem": col.amax_max()}}


@pytest.fixture()
def saved(tmp_path):
    cache = CalibrationCache(tmp_path / "calib.json")
    key = cache_key(COMPONENTS)
    payload = _payload()
    cache.save(key, payload, COMPONENTS)
    return cache, key, payload


def test_hit_returns_exact_payload_and_restores_collector(saved):
    cache, key, payload = saved
    got = cache.load(key, COMPONENTS)
    assert got == payload and cache.last_reason is None
    col = HistogramCollector("backbone.stem")
    col.load_state_dict(got["tensors"]["backbone.stem"])
    assert col.amax_max() == payload["amax"]["backbone.stem"]


def test_save_is_deterministic(tmp_path):
    a, b = CalibrationCache(tmp_path / "a.json"), CalibrationCache(tmp_path / "b.json")
    key = cache_key(COMPONENTS)
    a.save(key, _payload(), COMPONENTS)
    b.save(key, _payload(), dict(reversed(list(COMPONENTS.items()))))
    assert a.path.read_bytes() == b.path.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_key_ignores_order_and_tags_types():
    assert cache_key(COMPONENTS) == cache_key(dict(reversed(list(COMPONENTS.items()))))
    assert cache_key({"x": "1"}) != cache_key({"x": 1}) != cache_key({"x": 1.0})
    assert cache_key({"x": True}) != cache_key({"x": 1})
    assert cache_key({"x": b"ab"}) != cache_key({"x": "ab"})
    assert cache_key({"a": "bc"}) != cache_key({"ab": "c"})


@pytest.mark.parametrize(
    "name, new",
    [
        ("weights_sha256", hashlib.sha256(b"other weights").hexdigest()),
        ("calib_data", b"\x00\x01image-bytez"),
        ("num_batches", 33),
        ("percentile", 99.999),
        ("recipe", {"method": "entropy", "num_bins": 2048, "skip": ["head.reg"]}),
    ],
)
def test_any_single_component_change_misses_and_is_named(saved, name, new, caplog):
    cache, _, _ = saved
    changed = {**COMPONENTS, name: new}
    assert explain_key(component_digests(COMPONENTS), component_digests(changed)) == f"changed: {name}"
    with caplog.at_level(logging.INFO, logger="quantkit"):
        assert cache.load(cache_key(changed), changed) is None
    assert "key mismatch" in cache.last_reason and f"changed: {name}" in cache.last_reason
    assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_added_component_is_named(saved):
    cache, _, _ = saved
    more = {**COMPONENTS, "quantkit_version": "0.2.0"}
    assert cache.load(cache_key(more), more) is None
    assert "new: quantkit_version" in cache.last_reason


def test_missing_file(tmp_path):
    cache = CalibrationCache(tmp_path / "none.json")
    assert cache.load(cache_key(COMPONENTS)) is None
    assert "no cache file" in cache.last_reason


def _rewrite(cache, edit) -> None:
    doc = json.loads(cache.path.read_text())
    edit(doc)
    cache.path.write_text(json.dumps(doc))


def test_truncated_json_is_ignored(saved, caplog):
    cache, key, _ = saved
    text = cache.path.read_bytes()
    cache.path.write_bytes(text[: len(text) // 2])
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        assert cache.load(key) is None
    assert "corrupt JSON" in cache.last_reason
    assert any("corrupt JSON" in r.getMessage() for r in caplog.records)


def test_edited_payload_with_stale_checksum_is_ignored(saved):
    cache, key, _ = saved
    _rewrite(cache, lambda d: d["payload"]["amax"].__setitem__("backbone.stem", 1.5))
    assert cache.load(key) is None
    assert "checksum mismatch" in cache.last_reason


def test_wrong_key_inside_file_is_ignored(saved):
    cache, key, _ = saved
    other = cache_key({**COMPONENTS, "num_batches": 1})
    _rewrite(cache, lambda d: d.__setitem__("key", other))
    assert cache.load(key) is None and "key mismatch" in cache.last_reason
    # forging the key to match without the checksum is caught too
    _rewrite(cache, lambda d: d.__setitem__("key", key))
    assert cache.load(key) is not None  # restored: same bytes as saved, verified again
    cache.save(other, {"amax": {}})
    _rewrite(cache, lambda d: d.__setitem__("key", key))
    assert cache.load(key) is None and "checksum mismatch" in cache.last_reason


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.__setitem__("schema", "quantkit.calibration-cache/0"), "schema"),
        (lambda d: d.pop("sha256"), "sha256"),
        (lambda d: d.__setitem__("payload", [1, 2]), "payload"),
        (lambda d: d.__setitem__("components", {"x": 1}), "components"),
    ],
)
def test_wrong_schema_is_ignored(saved, edit, words):
    cache, key, _ = saved
    _rewrite(cache, edit)
    assert cache.load(key) is None
    assert "wrong schema" in cache.last_reason and words in cache.last_reason


def test_not_an_object_and_not_utf8(saved):
    cache, key, _ = saved
    cache.path.write_text("[1, 2, 3]")
    assert cache.load(key) is None and "wrong schema" in cache.last_reason
    cache.path.write_bytes(b"\xff\xfe\x00garbage")
    assert cache.load(key) is None and "corrupt JSON" in cache.last_reason


def test_bad_inputs_raise_usage_errors(tmp_path):
    cache = CalibrationCache(tmp_path / "c.json")
    key = cache_key(COMPONENTS)
    with pytest.raises(UsageError, match="NaN"):
        cache.save(key, {"amax": float("nan")})
    with pytest.raises(UsageError, match="does not match"):
        cache.save(key, {}, {**COMPONENTS, "num_batches": 1})
    with pytest.raises(UsageError, match="path"):
        cache_key({"weights": tmp_path})
    with pytest.raises(UsageError, match="at least one"):
        cache_key({})
    with pytest.raises(UsageError, match="plain JSON"):
        cache_key({"recipe": {"a": object()}})
    assert not cache.path.exists()
