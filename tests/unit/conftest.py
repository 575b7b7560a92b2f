"""Unit-test setup: `lora_ops` importable as a top-level package, without ComfyUI."""

import importlib.util
import os
import sys
import types

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# The pack root has an __init__.py (ComfyUI loads the pack as a package), so pytest treats it as
# a test package and imports it before the first test; that import needs `comfy_api`. Without
# ComfyUI on the path, register an inert stand-in for the pack so the pure-torch tests can run.
_PACK_NAME = os.path.basename(REPO_ROOT)
if importlib.util.find_spec("comfy_api") is None and _PACK_NAME not in sys.modules:
    _pack_stub = types.ModuleType(_PACK_NAME, "stand-in for the pack root in unit tests")
    _pack_stub.__file__ = os.path.join(REPO_ROOT, "__init__.py")
    _pack_stub.__path__ = [REPO_ROOT]
    sys.modules[_PACK_NAME] = _pack_stub
