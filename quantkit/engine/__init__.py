"""Engine stage: TensorRT build plans, ``build_engine.sh``, the lazy TensorRT builder and engine inspection.

Entries: :func:`write_build_script` (every export), :func:`build_here` (``--engine``), :func:`check_possible`
(before calibrating), :func:`build_and_inspect` (``quantkit build``). TensorRT is imported only inside them.
"""

from quantkit.engine.local import build_and_inspect
from quantkit.engine.plan_files import build_engine_files, build_here, check_possible, write_build_script, write_calibration_cache

__all__ = ["write_build_script", "write_calibration_cache", "build_here", "build_engine_files", "check_possible", "build_and_inspect"]
