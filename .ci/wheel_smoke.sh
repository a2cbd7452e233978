#!/usr/bin/env bash
# Wheel smoke test: what a new user gets from `pip install quantkit`, not what the checkout happens to have.
# Builds the sdist and (from it) the wheel, installs the wheel into a fresh venv (torch pinned first), and from
# an empty folder runs `quantkit export` (bundled model, calibration and held-out data, all read from inside
# the installed package), `quantkit export --recipe trees` (a shipped recipe by name) and `quantkit verify`.
# Usage: .ci/wheel_smoke.sh [PYTHON]   (run from anywhere; writes only under .smoke/ and dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${1:-python3}
SMOKE=$REPO/.smoke
DIST=$REPO/dist
PIP=(--quiet --disable-pip-version-check)
t0=$(date +%s)
stamp() { echo "wheel-smoke: $* ($(( $(date +%s) - t0 )) s)"; }

rm -rf "$SMOKE" "$DIST"
mkdir -p "$SMOKE/empty" "$SMOKE/cache"
"$PYTHON" -m venv "$SMOKE/build-venv"
"$SMOKE/build-venv/bin/pip" install "${PIP[@]}" build
"$SMOKE/build-venv/bin/python" -m build --outdir "$DIST" . > "$SMOKE/build.log" 2>&1 \
  || { cat "$SMOKE/build.log"; exit 1; }   # sdist first, then the wheel built from the unpacked sdist
stamp "built $(cd "$DIST" && ls)"
"$SMOKE/build-venv/bin/python" - "$DIST" <<'PY'
import pathlib, sys, tarfile, zipfile
dist = pathlib.Path(sys.argv[1])
wheel = zipfile.ZipFile(next(dist.glob("*.whl"))).namelist()
sdist = tarfile.open(next(dist.glob("*.tar.gz"))).getnames()
need = ["calibration/trees", "evaldata/trees_holdout/annotations.json", "recipes/trees.yaml"]
missing = [n for n in need if not any(f.startswith("quantkit/_bundled/" + n) for f in wheel)]
missing += ["sdist:" + n for n in need if not any(f.split("/", 1)[-1].startswith(n) for f in sdist)]
missing += [n for n in ("quantkit/py.typed", "quantkit/assets/tree_detector.pt") if n not in wheel]
sys.exit(f"wheel-smoke: missing from the distributions: {missing}" if missing else 0)
PY

"$PYTHON" -m venv "$SMOKE/venv"
V=$SMOKE/venv/bin
"$V/pip" install "${PIP[@]}" torch==2.13.0   # pinned first: an unpinned torch pulls a multi-GB CUDA build
"$V/pip" install "${PIP[@]}" "$(ls "$DIST"/*.whl)[eval]"
stamp "installed into a fresh venv"

cd "$SMOKE/empty"   # nothing of the checkout here, and nothing of it on the path
export QUANTKIT_CACHE_DIR=$SMOKE/cache CI=true
unset PYTHONPATH
"$V/python" -c "import quantkit.paths as p, sys; r = p.bundle_root(); print('bundle:', r); \
sys.exit(0 if '_bundled' in r.parts and 'site-packages' in r.parts else 'bundled data not read from the wheel')"
"$V/quantkit" recipes
"$V/quantkit" export --json --out o1 < /dev/null > o1.json
"$V/quantkit" verify o1
stamp "quantkit export (defaults) + verify"
"$V/quantkit" export --recipe trees --json --out o2 < /dev/null > o2.json
"$V/quantkit" verify o2
stamp "quantkit export --recipe trees + verify"
"$V/python" - <<'PY'
import json, sys
for name in ("o1", "o2"):
    summary = json.loads(open(f"{name}.json").read())
    report = json.load(open(f"{name}/report.json"))
    ev = report.get("evaluation")
    problems = []
    if not summary["ok"]:
        problems.append(f"summary not ok: {summary}")
    if not ev or ev.get("data") != "evaldata/trees_holdout" or "map50_95" not in ev.get("int8_onnx", {}):
        problems.append(f"no held-out evaluation of the bundled data in report.json: {ev!r}")
    if report["calibration"]["data"] != "calibration/trees":
        problems.append(f"calibration data named {report['calibration']['data']!r}, not calibration/trees")
    if problems:
        sys.exit(f"wheel-smoke {name}: " + "; ".join(problems))
    print(f"wheel-smoke {name}: held-out mAP50:95 FP32 {ev['fp32_onnx']['map50_95']:.4f} "
          f"INT8 {ev['int8_onnx']['map50_95']:.4f}, files {len(summary['files'])}")
PY
stamp "passed"
