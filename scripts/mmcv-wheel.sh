#!/usr/bin/env bash
# Prints the path of an mmcv wheel with its compiled ops for this venv's torch, building it once per
# machine into a cache outside the repository (mmcv has no wheel for our torch; about 15 minutes on
# 2 cores). The wheel's name does not say which torch it was built for, so the cache key does.
#   usage: scripts/mmcv-wheel.sh PYTHON
set -euo pipefail
PY=${1:?usage: $0 PYTHON}
MMCV_VERSION=2.1.0
read -r TORCH_VERSION PY_TAG < <("$PY" -c 'import sys, torch; print(torch.__version__.split("+")[0], f"cp{sys.version_info.major}{sys.version_info.minor}")')
CACHE=${KONTINUE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kontinue/wheels}/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG
WHEEL=$(ls "$CACHE"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$WHEEL" ]; then echo "$WHEEL"; exit 0; fi

echo "building mmcv $MMCV_VERSION for torch $TORCH_VERSION ($PY_TAG) into $CACHE (about 15 minutes on 2 cores)" >&2
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
# mmcv's setup.py imports pkg_resources (setuptools < 81) and builds with ninja.
"$PY" -m pip install -q setuptools==80.9.0 ninja==1.13.2 >&2
# torch 2.14's headers need C++20, and mmcv's setup.py puts -std=c++17 last on the command line,
# where CXXFLAGS cannot override it: a compiler wrapper rewrites it, mmcv's sources stay as shipped.
cat > "$BUILD/g++" <<'WRAP'
#!/usr/bin/env bash
args=()
for arg in "$@"; do [ "$arg" = "-std=c++17" ] && arg="-std=c++20"; args+=("$arg"); done
exec g++ "${args[@]}"
WRAP
chmod +x "$BUILD/g++"
PATH="$(dirname "$PY"):$PATH" CXX="$BUILD/g++" MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 \
  "$PY" -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps "mmcv==$MMCV_VERSION" -w "$BUILD/wheel" >&2
mkdir -p "$CACHE"
built=$(ls "$BUILD"/wheel/mmcv-*.whl)
cp "$built" "$CACHE/.partial" && mv "$CACHE/.partial" "$CACHE/$(basename "$built")"
echo "$CACHE/$(basename "$built")"
