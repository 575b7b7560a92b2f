#!/usr/bin/env bash
# The whole suite against every ComfyUI the pack supports, one after the other, each in its own
# harness (scripts/setup_harness.sh); prints one result line per ComfyUI and fails if any failed.
#
#   COMFYUI_VERSIONS  which to run (default "0.3.75 0.33.0"); 0.33.0 needs its tarball
#                     ($COMFYUI_TARBALL, default ../shared/comfyui/ComfyUI-0.33.0.tar.gz):
#                     when the default list is used and the tarball is absent, it is left out
#                     with a notice, so a fresh clone without ../shared still tests 0.3.75.
#   COMFYUI_PATH      a ComfyUI checkout of your own: the suite runs once, against it
#   extra arguments go to pytest (e.g. tests/unit, -k trainer)
set -uo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PACK_DIR"

if [ -n "${COMFYUI_PATH:-}" ]; then
    versions="${COMFYUI_VERSION:-0.3.75}"
elif [ -n "${COMFYUI_VERSIONS:-}" ]; then
    versions="$COMFYUI_VERSIONS"
else
    versions="0.3.75"
    tarball="${COMFYUI_TARBALL:-$PACK_DIR/../shared/comfyui/ComfyUI-0.33.0.tar.gz}"
    if [ -f "$tarball" ]; then
        versions="$versions 0.33.0"
    else
        echo "[test] ComfyUI 0.33.0 left out: no tarball at $tarball (set COMFYUI_TARBALL)"
    fi
fi

summary=""
status=0
for version in $versions; do
    echo "=================== ComfyUI $version ==================="
    setup_log="$(mktemp)"
    if ! COMFYUI_VERSION="$version" bash scripts/setup_harness.sh 2>&1 | tee "$setup_log"; then
        summary="$summary\nComfyUI $version: harness set-up FAILED"
        status=1
        continue
    fi
    comfy="$(sed -n 's/^COMFYUI=//p' "$setup_log" | tail -1)"
    python="$(sed -n 's/^PYTHON=//p' "$setup_log" | tail -1)"
    rm -f "$setup_log"
    result_log="$(mktemp)"
    COMFYUI_PATH="$comfy" "$python" -m pytest --rootdir tests -c tests/pytest.ini "${@:-tests}" 2>&1 | tee "$result_log"
    code=${PIPESTATUS[0]}
    [ "$code" -eq 0 ] || status=1
    result="$(grep -E '(passed|failed|error|no tests ran).* in [0-9.]+s' "$result_log" | tail -1 | tr -d '=' | sed 's/^ *//')"
    summary="$summary\nComfyUI $version ($comfy): ${result:-pytest ended with exit code $code and no summary (killed?)}"
    rm -f "$result_log"
done
echo "=================== results ==================="
printf '%b\n' "${summary#\\n}"
exit $status
