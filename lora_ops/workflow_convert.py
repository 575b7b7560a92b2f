"""Convert a UI-format ComfyUI workflow (what the frontend saves) into the API prompt format.

Follows what the ComfyUI frontend (1.32) does in `graphToPrompt` when it queues a workflow, so a
saved `.json` can be run headless without a browser:

- links are followed to their origin node; Reroute nodes are passed through, bypassed nodes
  (mode 4) hand on their input of the matching type, muted nodes (mode 2) are left out together
  with every link input that points at them;
- `widgets_values` are assigned in order to the node's widget inputs, taken from `/object_info`
  (required then optional, in `input_order`); an INT widget named `seed` / `noise_seed` (or with
  `control_after_generate`) is followed by the frontend-only "control after generate" value, a
  COMBO with `control_after_generate` by that value and a filter-list value: both are skipped;
- a PrimitiveNode's value replaces the widget it drives; Note / MarkdownNote / PrimitiveNode /
  Reroute never reach the prompt;
- each prompt node gets `_meta.title`: the node's title, else the type's display name.

- an image-upload COMBO (LoadImage's `image`) is followed by its upload button's value ("image"
  in what the frontend saves, e.g. `["example.png", "image"]`): skipped.

Subgraphs and widgets that extensions add (video / audio upload buttons and the like) are not
covered: they raise `WorkflowConvertError`, as does any mismatch between `widgets_values` and the node
definition, instead of producing a prompt with values on the wrong inputs.
"""

from __future__ import annotations

from typing import Any

from .errors import user_facing

MODE_MUTED = 2  # LGraphEventMode.NEVER
MODE_BYPASSED = 4  # LGraphEventMode.BYPASS
VIRTUAL_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_WIDGET_NAMES = ("seed", "noise_seed")
# the frontend adds an upload button widget; LoadImage's saves its value after the file name
IMAGE_UPLOAD, OTHER_UPLOADS = "image_upload", ("video_upload", "audio_upload")


@user_facing
class WorkflowConvertError(ValueError):
    """The workflow cannot be turned into an API prompt (unknown node, bad links, widget mismatch)."""


def is_ui_workflow(data: Any) -> bool:
    """UI workflows have a top-level `nodes` list; API prompts are a dict of node id -> node."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Return the API prompt `{node_id: {"inputs", "class_type", "_meta"}}` for a UI workflow.

    `object_info` is the server's `GET /object_info` answer (only the node types used are read).
    """
    _check_structure(workflow)
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowConvertError("workflows with subgraphs are not supported; export them as API format")
    graph = _Graph(workflow)
    prompt: dict[str, dict] = {}
    for node in graph.nodes.values():
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        definition = object_info.get(node["type"])
        if definition is None:
            raise WorkflowConvertError(f"node {node['id']}: unknown node type {node['type']!r} (not in /object_info)")
        inputs = _widget_inputs(node, definition)
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            source = graph.resolve_link(slot["link"], slot.get("type", "*"))
            if source is not None:
                inputs[slot["name"]] = source.value
        prompt[str(node["id"])] = {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node.get("title") or definition.get("display_name") or node["type"]},
        }
    # Links into muted nodes (or bypassed ones with nothing to pass on) are dropped, as the frontend does.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if _is_link(value) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_structure(workflow: Any) -> None:
    """The shapes the conversion reads, checked first: a workflow file is untrusted JSON."""
    def fail(problem: str):
        raise WorkflowConvertError(f"malformed workflow: {problem}")

    if not isinstance(workflow, dict):
        fail("the top level is not a JSON object")
    if not isinstance(workflow.get("definitions", {}), dict):
        fail("'definitions' is not an object")
    nodes, links = workflow.get("nodes", []), workflow.get("links", [])
    if not isinstance(nodes, list) or not isinstance(links, list):
        fail("'nodes' and 'links' must be lists")
    ids = set()
    for node in nodes:
        if not isinstance(node, dict) or not (_is_int(node.get("id")) or isinstance(node.get("id"), str)):
            fail(f"a node without an id: {str(node)[:80]}")
        where = f"node {node['id']!r}"
        if node["id"] in ids:
            fail(f"{where} appears twice")
        ids.add(node["id"])
        if not isinstance(node.get("type"), str) or not _is_int(node.get("mode", 0)):
            fail(f"{where} has no type name or a non-integer mode")
        if not isinstance(node.get("title") or "", str) or not isinstance(node.get("widgets_values"), (list, dict, type(None))):
            fail(f"{where} has a title that is not text or widgets_values that are not a list")
        for key in ("inputs", "outputs"):
            slots = node.get(key) or []
            if not isinstance(slots, list) or not all(isinstance(slot, dict) for slot in slots):
                fail(f"{where}: '{key}' is not a list of objects")
            for slot in slots:
                if not isinstance(slot.get("type", "*"), str) or not isinstance(slot.get("name", ""), str):
                    fail(f"{where}: a slot of '{key}' has a name or type that is not text")
        if not all(slot.get("link") is None or (_is_int(slot["link"]) and "name" in slot) for slot in node.get("inputs") or []):
            fail(f"{where}: a linked input has no name or a link that is not an integer")
    for link in links:
        fields = (link.get("id"), link.get("origin_id"), link.get("origin_slot")) if isinstance(link, dict) \
            else tuple(link[:3]) if isinstance(link, list) and len(link) >= 3 else None
        if fields is None or not _is_int(fields[0]) or not _is_int(fields[2]) or fields[2] < 0 \
                or not (_is_int(fields[1]) or isinstance(fields[1], str)):
            fail(f"link {str(link)[:80]} is not [id, origin node, origin slot, ...]")


class _Source:
    """What an input resolves to: a link `[origin_id, slot]` or a PrimitiveNode's literal value."""

    def __init__(self, value: Any):
        self.value = value


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes = {node["id"]: node for node in workflow.get("nodes", [])}
        self.links = {}
        for link in workflow.get("links", []):
            # Saved workflows store links as arrays; schema version 1 stores objects.
            if isinstance(link, dict):
                link_id, origin_id, origin_slot = link["id"], link["origin_id"], link["origin_slot"]
            else:
                link_id, origin_id, origin_slot = link[0], link[1], link[2]
            self.links[link_id] = (origin_id, origin_slot)

    def resolve_link(self, link_id: int, wanted_type: str) -> _Source | None:
        """Follows a link back through reroutes and bypassed nodes (a loop: chains may be long)."""
        seen = set()
        while True:
            if link_id in seen:
                raise WorkflowConvertError(f"link {link_id} is part of a cycle through reroutes or bypassed nodes")
            seen.add(link_id)
            if link_id not in self.links:
                raise WorkflowConvertError(f"link {link_id} is used by a node but missing from the workflow's links")
            origin_id, origin_slot = self.links[link_id]
            origin = self.nodes.get(origin_id)
            if origin is None:
                raise WorkflowConvertError(f"link {link_id} starts at node {origin_id}, which is not in the workflow")

            if origin["type"] == "PrimitiveNode":
                values = origin.get("widgets_values") or []
                return _Source(_wrap_list(values[0])) if isinstance(values, list) and values else None
            if origin["type"] == "Reroute":
                slot = 0
            elif origin.get("mode", 0) == MODE_BYPASSED:
                slot = _bypass_input_slot(origin, origin_slot, wanted_type)
            else:
                return _Source([str(origin_id), int(origin_slot)])
            inputs = origin.get("inputs") or []
            if slot is None or slot >= len(inputs) or inputs[slot].get("link") is None:
                return None
            link_id = inputs[slot]["link"]


def _bypass_input_slot(node: dict, output_slot: int, wanted_type: str) -> int | None:
    """Which input a bypassed node passes on for `output_slot` (frontend `ExecutableNodeDTO`)."""
    inputs = node.get("inputs") or []
    if wanted_type in ("*", ""):
        return output_slot if len(inputs) > output_slot else (0 if inputs else None)
    outputs = node.get("outputs") or []
    output_type = outputs[output_slot].get("type", "*") if output_slot < len(outputs) else "*"
    if output_slot < len(inputs):
        same_slot_type = inputs[output_slot].get("type", "*")
        if _types_connect(same_slot_type, output_type) and _types_connect(same_slot_type, wanted_type):
            return output_slot
    for index, slot in enumerate(inputs):
        if slot.get("type") == wanted_type:
            return index
    for index, slot in enumerate(inputs):
        if _types_connect(slot.get("type", "*"), output_type) and _types_connect(slot.get("type", "*"), wanted_type):
            return index
    return None


def _types_connect(a: str, b: str) -> bool:
    """LiteGraph.isValidConnection: wildcards match anything; comma lists match on any member."""
    if a in ("", "*") or b in ("", "*") or a == b:
        return True
    a_types, b_types = str(a).lower().split(","), str(b).lower().split(",")
    return any(x == y for x in a_types for y in b_types)


def widget_layout(definition: dict) -> list[tuple[str, int]]:
    """`(input name, number of widgets_values it occupies)` for each widget input, in frontend order."""
    specs = {}
    for section in ("required", "optional"):
        for name, spec in (definition.get("input", {}).get(section) or {}).items():
            specs[(section, name)] = spec
    order = definition.get("input_order") or {}
    ordered = [(section, name) for section in ("required", "optional")
               for name in order.get(section, []) if (section, name) in specs]
    ordered += [key for key in specs if key not in ordered]

    layout = []
    for section, name in ordered:
        spec = specs[(section, name)]
        input_type = spec[0] if spec else None
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(input_type, list):
            input_type = "COMBO"
        if input_type not in WIDGET_TYPES or options.get("forceInput"):
            continue
        width = 1
        if input_type == "INT" and options.get("control_after_generate", name in SEED_WIDGET_NAMES):
            width = 2  # + "control after generate"
        elif input_type == "COMBO" and options.get("control_after_generate"):
            width = 3  # + "control after generate" + "control filter list"
        elif input_type == "COMBO" and options.get(IMAGE_UPLOAD):
            width = 2  # + the upload button's value
        elif input_type == "COMBO" and any(options.get(key) for key in OTHER_UPLOADS):
            raise WorkflowConvertError(f"input {name!r} has an upload widget, which this converter does not map")
        layout.append((name, width))
    return layout


def _widget_inputs(node: dict, definition: dict) -> dict:
    values = node.get("widgets_values")
    layout = widget_layout(definition)
    if values is None:
        values = []
    if isinstance(values, dict):  # some custom nodes save widgets by name
        return {name: _wrap_list(values[name]) for name, _ in layout if name in values}
    expected = sum(width for _, width in layout)
    if len(values) != expected:
        names = ", ".join(name for name, _ in layout) or "none"
        raise WorkflowConvertError(
            f"node {node['id']} ({node['type']}): widgets_values has {len(values)} values, but its widgets "
            f"({names}) take {expected}; the workflow does not match this server's node definition"
        )
    inputs, position = {}, 0
    for name, width in layout:
        inputs[name] = _wrap_list(values[position])
        position += width
    return inputs


def _wrap_list(value: Any) -> Any:
    """The frontend sends list-valued widgets as {"__value__": [...]} so they are not taken for links."""
    return {"__value__": value} if isinstance(value, list) else value


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
