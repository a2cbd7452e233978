"""Build models from a registry name or a user file, and load weights safely.

``spec`` forms accepted by :func:`build_model`:

* a registered name (``yolo_nas_s``, ``trees``, ... see :mod:`quantkit.models.registry`);
* ``path/to/file.py:factory`` -- the file is imported by path and ``factory(**kw)`` must return an nn.Module.
  **This executes the file's code with your privileges**: only point it at files you trust;
* ``package.module:factory`` -- an importable module.

Weights are read with ``torch.load(..., weights_only=True)``: files that need arbitrary pickled code are
refused (re-save them as a plain state_dict, see :func:`load_weights`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import pickle
import sys
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from quantkit.errors import ModelError, QuantkitError, WeightsError
from quantkit.models.registry import count_parameters, get_entry, import_factory
from quantkit.quote import cap, qcap

#: Where a super-gradients trainer checkpoint keeps the weights, most preferred first.
CHECKPOINT_SECTIONS = ("ema_net", "net", "state_dict", "model")
_LIST_LIMIT = 20
#: A zip weights archive may declare at most this many times its own size in records (torch stores them
#: uncompressed: a real file declares about 1x), plus ARCHIVE_SLACK_BYTES for tiny files.
ARCHIVE_RATIO = 8
ARCHIVE_SLACK_BYTES = 1 << 20
log = logging.getLogger("quantkit")
RANDOM_INIT_NOTE = ("{name} was built without --weights and runs on its RANDOM initial weights: calibration, "
                    "parity and accuracy figures say nothing about a trained model. Pass --weights FILE")


class ModelSource(str, Enum):
    REGISTRY = "registry"
    FILE = "file"
    MODULE = "module"


@dataclass(frozen=True)
class ModelInfo:
    """What was built: registry-entry fields plus provenance.

    ``input_size`` is (H, W) in pixels or None when the model does not declare one (a user model without a
    ``default_input_size`` attribute); ``num_classes`` likewise. ``random_init``: a registered architecture
    built without a weights file (it runs on random weights; the report should say so).
    """

    name: str
    factory: str
    description: str
    input_size: tuple[int, int] | None
    num_classes: int | None
    source: ModelSource
    weights: str | None
    num_parameters: int
    random_init: bool = False


def build_model(spec: str, *, weights: str | None = None, num_classes: int | None = None,
                warn_random_init: bool = True) -> tuple[nn.Module, ModelInfo]:
    """Build the model named by ``spec`` (see the module docstring), optionally load ``weights``, set eval mode.

    ``warn_random_init=False``: no RANDOM-weights warning, for callers that only read the structure (layer names,
    ``quantkit layers``), where the weights do not matter.

    ``num_classes`` is passed to the factory as a keyword only when given; a factory that does not accept it
    raises ModelError. Raises UsageError for unknown names, ModelError for factory problems and WeightsError
    for weight files that cannot be loaded.
    """
    module_part, sep, attr = spec.rpartition(":")
    if sep and module_part.endswith(".py"):
        factory, source, description = _factory_from_file(Path(module_part), attr), ModelSource.FILE, f"user model {spec}"
        entry = None
    elif sep:
        factory, source, description = import_factory(spec), ModelSource.MODULE, f"user model {spec}"
        entry = None
    else:
        entry = get_entry(spec)
        factory, source, description = entry.resolve_factory(), ModelSource.REGISTRY, entry.description
    if entry is not None and weights is None:
        # A registered architecture without a weights file initializes randomly: seed that (without touching the
        # caller's RNG) so the same command gives the same model, calibration and bytes every time.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = _call_factory(factory, spec, num_classes)
    else:
        model = _call_factory(factory, spec, num_classes)
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    random_init = entry is not None and not entry.ships_weights and weights is None
    if random_init and warn_random_init:
        log.warning(RANDOM_INIT_NOTE.format(name=entry.name))
    input_size = getattr(model, "default_input_size", None) or (entry.input_size if entry else None)
    classes = num_classes or getattr(model, "num_classes", None) or (entry.num_classes if entry else None)
    info = ModelInfo(
        name=entry.name if entry else spec,
        factory=entry.factory if entry else spec,
        description=description,
        input_size=tuple(input_size) if input_size is not None else None,
        num_classes=classes,
        source=source,
        weights=str(weights) if weights is not None else None,
        num_parameters=count_parameters(model),
        random_init=random_init,
    )
    return model, info


def _factory_from_file(path: Path, attr: str) -> Callable[..., nn.Module]:
    if not attr:
        raise ModelError(f"missing factory name: use {path}:my_factory")
    if not path.is_file():
        raise ModelError(f"model file {path} not found: check the path in '{path}:{attr}'")
    resolved = path.resolve()
    name = "quantkit_user_model_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path} as a Python module: give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the file need their module registered
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # user code: any exception is possible, sys.exit() included
        sys.modules.pop(name, None)
        raise ModelError(f"importing {path} failed with {type(exc).__name__}: {cap(exc)}; fix the file and retry") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == name)
        raise ModelError(f"{path} has no callable '{attr}'; functions defined there: {', '.join(available) or 'none'}")
    return factory


def _call_factory(factory: Callable[..., Any], spec: str, num_classes: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "num_classes" not in params and not takes_kwargs:
            raise ModelError(f"factory for '{spec}' takes no num_classes argument: drop num_classes or add it to the factory")
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except QuantkitError:  # already names the fix (e.g. missing bundled weights)
        raise
    except (Exception, SystemExit) as exc:  # user code; a sys.exit() there must not end quantkit silently
        raise ModelError(f"factory for '{spec}' raised {type(exc).__name__}: {cap(exc)}; fix the factory") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory for '{spec}' returned {type(model).__name__}, not a torch.nn.Module: return the model")
    check_eager(model, f"factory for '{spec}'")
    return model


def check_eager(model: nn.Module, what: str = "the model") -> None:
    """ModelError for a TorchScript module (``torch.jit.load`` / ``torch.jit.script``): its layers are compiled
    code, so no quantizer can be put in front of them (it would fail later as "matches no quantizable layer")."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{what} returned a TorchScript module ({type(model).__name__}, from torch.jit.load or "
                         "torch.jit.script): quantkit quantizes an eager torch.nn.Module. Build the model from its "
                         "Python class and load its weights, or export it to an FP32 ONNX file and pass that "
                         "(quantkit export model.onnx --calib DATA)")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file safely; returns (state_dict with ``module.`` prefixes stripped, section used).

    Accepts a plain ``{name: tensor}`` mapping or a trainer checkpoint holding one under ``ema_net``
    (preferred), ``net``, ``state_dict`` or ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found: check the path")
    check_archive_sizes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path} needs arbitrary pickled Python objects to load, which quantkit refuses for safety "
            "(loading it could run code). In a trusted environment re-save only the tensors: "
            "`torch.save(model.state_dict(), 'weights.pt')` (for a super-gradients checkpoint: "
            "`torch.save(ckpt['ema_net'] or ckpt['net'], 'weights.pt')`)."
            f" Detail: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    except Exception as exc:  # corrupt or non-torch file
        raise WeightsError(f"{path} is not a readable torch weights file ({type(exc).__name__}: {cap(exc)})") from exc
    state, section = _extract(obj, path)
    _check_entries(state, path, section)
    return {_strip_module(k): v for k, v in state.items()}, section


def check_archive_sizes(path: Path, ratio: int = ARCHIVE_RATIO, slack: int = ARCHIVE_SLACK_BYTES) -> None:
    """WeightsError, before ``torch.load`` reads a byte of data, when a zip weights archive (torch's format since
    1.6) declares records larger than the file can hold: torch allocates each record at its declared size, so a
    9 MB file declaring 2 GB records takes 2 GB of memory. torch stores records uncompressed, so a real file
    declares about its own size; more than ``ratio`` x the file size + ``slack`` bytes is refused. Files that
    are not zip archives (torch's legacy format) are left to ``torch.load``."""
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise WeightsError(f"{path} is not a readable torch weights file (a damaged zip archive: {cap(exc)}); "
                           "save it again with torch.save") from None
    declared = sum(m.file_size for m in members)
    if declared > ratio * size + slack:
        big = max(members, key=lambda m: m.file_size)
        raise WeightsError(f"{path} is {size:,} bytes but its archive declares {declared:,} bytes of records "
                           f"(largest: {qcap(big.filename)}, {big.file_size:,} bytes); quantkit refuses to inflate "
                           "it (a damaged or hostile file). Save the weights again with "
                           "torch.save(model.state_dict(), 'weights.pt')")


def _check_entries(state: Mapping[Any, torch.Tensor], path: Path, section: str) -> None:
    """Names must be strings and tensors dense, real (not meta) and float-or-integer (not quantized): anything
    else did not come from a trained float ``model.state_dict()``."""
    for k, v in state.items():
        if not isinstance(k, str):
            raise WeightsError(f"{path} ({section}) has a key {cap(repr(k))} of type {type(k).__name__}: a state_dict "
                               "maps parameter names (strings) to tensors; save model.state_dict()")
        if v.layout != torch.strided:
            raise WeightsError(f"{path} ({section}): {qcap(k)} is a {str(v.layout).replace('torch.', '')} tensor; "
                               "quantkit loads dense weights: save {name: t.to_dense()} instead")
        if v.is_meta:
            raise WeightsError(f"{path} ({section}): {qcap(k)} is a meta tensor (a shape without values, as from a "
                               "model built on torch.device('meta')); save the state_dict of a model whose weights "
                               "are loaded or trained")
        if v.is_quantized:
            raise WeightsError(f"{path} ({section}): {qcap(k)} is a quantized {str(v.dtype).replace('torch.', '')} "
                               "tensor; quantkit quantizes float weights itself: save the float model's state_dict "
                               "(or {name: t.dequantize()} for each quantized tensor)")


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _extract(obj: Any, path: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    if _is_tensor_map(obj):
        return obj, "state_dict"
    if isinstance(obj, Mapping):
        for section in CHECKPOINT_SECTIONS:
            if _is_tensor_map(obj.get(section)):
                return obj[section], section
        keys = ", ".join(cap(k, 80) for k in list(obj)[:10])
        raise WeightsError(
            f"{path} holds a dict without weights (keys: {keys}): expected {{name: tensor}} or a checkpoint "
            f"with one of {', '.join(CHECKPOINT_SECTIONS)}"
        )
    raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict: save model.state_dict()")


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(cap(i) for i in items[:_LIST_LIMIT])
    more = f" ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _hints(missing: list[str], file_keys: list[str], mismatched: dict[str, tuple]) -> list[str]:
    hints = []
    if any(".branch_3x3." in k for k in missing) and not any(".branch_3x3." in k for k in file_keys):
        hints.append("the file was saved after QA-RepVGG fusion: load it into a model fused the same way")
    cls = [k for k in mismatched if k.endswith("cls_pred.weight")]
    if cls:
        n = mismatched[cls[0]][0][0]
        hints.append(f"the file has {n} classes: pass num_classes={n}")
    return hints


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load ``path`` into ``model`` strictly (in place); returns the checkpoint section used.

    Raises WeightsError listing missing, unexpected and shape-mismatched keys (first 20 of each, with counts).
    """
    state, section = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = {
        k: (tuple(state[k].shape), tuple(expected[k].shape)) for k in expected if k in state and state[k].shape != expected[k].shape
    }
    if missing or unexpected or mismatched:
        parts = [f"{path} ({section}) does not match {type(model).__name__}:"]
        if missing:
            parts.append(_listing("missing", missing))
        if unexpected:
            parts.append(_listing("unexpected", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatch (file vs model)", [f"{k} {a} vs {b}" for k, (a, b) in mismatched.items()]))
        parts += [f"hint: {h}" for h in _hints(missing, list(state), mismatched)]
        raise WeightsError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)
    return section
