"""The ComfyUI internals the pack relies on still exist, with the parameters the pack passes.

Read from the pack's own source (every ``comfy.*``, ``comfy_extras.*``, ``comfy_api.*`` and
``folder_paths`` name the nodes use, and every call of one), so a ComfyUI upgrade that drops or
changes one fails here with the name and the file, not deep inside a server test. The ``comfy.*`` and
``comfy_extras.*`` names must also be listed in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_SOURCES = sorted((REPO_ROOT / "nodes").rglob("*.py")) + [REPO_ROOT / "__init__.py"]
ROOTS = ("comfy", "comfy_extras", "comfy_api", "folder_paths")
# Methods of ComfyUI objects the pack calls or overrides (FluxQModelPatcher), with the parameters it
# passes: the source scan above cannot see calls on instances.
METHODS = {
    "comfy.model_patcher.ModelPatcher.patch_weight_to_device": ("key", "device_to", "inplace_update"),
    "comfy.model_patcher.ModelPatcher.pin_weight_to_device": ("key",),
    "comfy.model_patcher.ModelPatcher.unpatch_model": ("device_to", "unpatch_weights"),
    "comfy.model_patcher.ModelPatcher.clone": (),
    "comfy.model_patcher.ModelPatcher.get_wrappers": ("wrapper_type", "key"),
    "comfy.model_patcher.ModelPatcher.add_wrapper_with_key": ("wrapper_type", "key", "wrapper"),
    "comfy.model_patcher.ModelPatcher.remove_wrappers_with_key": ("wrapper_type", "key"),
    "comfy.model_patcher.ModelPatcher.get_model_object": ("name",),
    "comfy.model_patcher.ModelPatcher.get_attachment": ("key",),
    "comfy.model_patcher.ModelPatcher.set_attachments": ("key", "attachment"),
    "comfy.model_patcher.LowVramPatch": ("key", "patches"),
    "comfy.model_base.BaseModel.state_dict_for_saving": (),
    "comfy.model_base.BaseModel.get_dtype": (),
    "comfy.model_base.BaseModel.load_model_weights": ("sd", "unet_prefix"),
    "comfy.supported_models_base.BASE.get_model": ("state_dict", "prefix"),
    "comfy.supported_models_base.BASE.set_inference_dtype": ("dtype", "manual_cast_dtype"),
    "comfy.supported_models_base.BASE.process_unet_state_dict_for_saving": ("state_dict",),
    "comfy.sd.CLIP.clone": (),
    "comfy.sd.CLIP.add_patches": ("patches", "strength_patch"),
}
# Used only where a feature test finds them (hasattr / signature), so absent in some ComfyUIs.
FEATURE_TESTED = {
    "comfy.model_management.in_training",  # 0.33+, set by comfy_glue.training_mode()
    # klein's encoder (0.33+): reached only after the version check that refuses klein on 0.3.75
    "comfy.text_encoders.flux.klein_te",
    "comfy.text_encoders.flux.KleinTokenizer",
    "comfy.text_encoders.flux.KleinTokenizer8B",
}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def comfy_references() -> dict[str, list[tuple[str, ast.Call | None]]]:
    """Every ComfyUI name the pack's nodes use -> [(file:line, the call, if it is called)]."""
    found: dict[str, list] = {}
    for path in PACK_SOURCES:
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ROOTS:
                        aliases[(a.asname or a.name).split(".")[0]] = (a.asname and a.name) or a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ROOTS:
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        seen_parents = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Attribute, ast.Name)) or id(node) in seen_parents:
                continue
            if isinstance(node, ast.Attribute):
                inner = node.value
                while isinstance(inner, ast.Attribute):  # only the longest chain counts
                    seen_parents.add(id(inner))
                    inner = inner.value
                seen_parents.add(id(inner))
            dotted = _dotted(node)
            if dotted is None or dotted.split(".")[0] not in aliases:
                continue
            head, _, rest = dotted.partition(".")
            full = aliases[head] + ("." + rest if rest else "")
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            found.setdefault(full, []).append((where, calls.get(id(node))))
    return found


def resolve(dotted: str):
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.fixture(scope="module")
def references(models_dir):  # models_dir: fails clearly when the harness ComfyUI is missing
    return comfy_references()


def test_every_comfyui_name_the_pack_uses_exists(references):
    missing = []
    for name, uses in sorted(references.items()):
        if name in FEATURE_TESTED:
            continue
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name} (used at {uses[0][0]}): {type(e).__name__}: {e}")
    assert not missing, "ComfyUI internals the pack uses are gone in this ComfyUI:\n" + "\n".join(missing)


def test_every_call_into_comfyui_fits_its_signature(references):
    wrong = []
    for name, uses in sorted(references.items()):
        try:
            target = resolve(name)
            signature = inspect.signature(target)
        except (ImportError, AttributeError, TypeError, ValueError):
            continue  # not callable, or a builtin without a signature
        for where, call in uses:
            if call is None or any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
                continue
            try:
                signature.bind_partial(*[None] * len(call.args), **{k.arg: None for k in call.keywords})
            except TypeError as e:
                wrong.append(f"{name}{signature} called at {where}: {e}")
    assert not wrong, "calls into ComfyUI that no longer fit:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name, parameters", sorted(METHODS.items()))
def test_methods_the_pack_calls_or_overrides_keep_their_parameters(models_dir, name, parameters):
    params = inspect.signature(resolve(name)).parameters
    missing = [p for p in parameters if p not in params]
    assert not missing, f"{name}{inspect.signature(resolve(name))} lost {missing}, which nodes/ passes"


def test_architecture_doc_lists_every_comfy_internal(references):
    doc = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## ComfyUI internals the pack relies on", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`((?:comfy|comfy_extras)\.[\w.]+)`", section))
    used = {name for name in references if name.split(".")[0] in ("comfy", "comfy_extras")}
    # a module or class reached only through its attributes is covered by them
    leaves = {n for n in used if not any(other.startswith(n + ".") for other in used)}
    assert not leaves - listed, f"docs/ARCHITECTURE.md does not list: {sorted(leaves - listed)}"
    unused = listed - used - set(METHODS)
    assert not unused, f"docs/ARCHITECTURE.md lists what the pack no longer uses: {sorted(unused)}"


# ComfyUI's internals (its model code and its server-side helper modules); the node files may use
# the V3 node API (comfy_api) and folder_paths, everything else goes through the glue.
INTERNAL_ROOTS = ("comfy", "comfy_extras", "latent_preview", "node_helpers", "nodes", "server", "execution")


def test_only_the_glue_imports_comfyui_internals():
    offenders = []
    for path in PACK_SOURCES:
        if "comfy_glue" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {m}" for m in modules
                          if m.split(".")[0] in INTERNAL_ROOTS]
    assert not offenders, "only nodes/comfy_glue/ may import ComfyUI internals:\n" + "\n".join(offenders)
