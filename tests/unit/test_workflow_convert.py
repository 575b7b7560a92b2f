"""UI workflow -> API prompt conversion, rule by rule, against a small hand-written /object_info."""

import pytest

from lora_ops.workflow_convert import WorkflowConvertError, is_ui_workflow, ui_to_api, widget_layout

OBJECT_INFO = {
    "Loader": {
        "display_name": "Load Model",
        "input": {"required": {"name": [["a.gguf", "b.gguf"], {}], "dtype": [["auto", "float16"], {}]}},
        "input_order": {"required": ["name", "dtype"]},
    },
    "Encode": {
        "display_name": "Encode Text",
        "input": {"required": {"model": ["MODEL", {}], "text": ["STRING", {"multiline": True}]}},
        "input_order": {"required": ["model", "text"]},
    },
    "Sampler": {
        "display_name": "Sampler",
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "positive": ["CONDITIONING", {}],
                "seed": ["INT", {"default": 0}],
                "steps": ["INT", {"default": 20}],
                "cfg": ["FLOAT", {"default": 1.0}],
            },
            "optional": {"latent": ["LATENT", {}], "denoise": ["FLOAT", {"default": 1.0}]},
        },
        # input_order, not dict order, decides the widget order
        "input_order": {"required": ["model", "seed", "positive", "steps", "cfg"], "optional": ["latent", "denoise"]},
    },
    "ApplyLoRA": {
        "display_name": "Apply LoRA",
        "input": {"required": {"model": ["MODEL", {}], "lora_name": [["x.safetensors"], {}], "strength": ["FLOAT", {}]}},
        "input_order": {"required": ["model", "lora_name", "strength"]},
    },
    "Save": {
        "display_name": "Save",
        "input": {"required": {"samples": ["LATENT", {}], "filename_prefix": ["STRING", {}]}},
        "input_order": {"required": ["samples", "filename_prefix"]},
    },
}


def node(node_id, node_type, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    entry = {
        "id": node_id,
        "type": node_type,
        "pos": [0, 0],
        "size": [200, 100],
        "flags": {},
        "order": node_id,
        "mode": mode,
        "inputs": [dict(slot) for slot in inputs],
        "outputs": [dict(slot) for slot in outputs],
        "properties": {},
    }
    if widgets is not None:
        entry["widgets_values"] = widgets
    if title:
        entry["title"] = title
    return entry


def slot(name, slot_type, link=None, widget=False):
    entry = {"name": name, "type": slot_type, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def out(name, slot_type, links=()):
    return {"name": name, "type": slot_type, "links": list(links)}


def base_graph():
    """Loader -> Encode -> Sampler -> Save, the sampler's model also straight from the loader."""
    nodes = [
        node(1, "Loader", ["a.gguf", "auto"], outputs=[out("MODEL", "MODEL", [1, 2])], title="My loader"),
        node(2, "Encode", ["a cat"], inputs=[slot("model", "MODEL", 1)], outputs=[out("CONDITIONING", "CONDITIONING", [3])]),
        node(
            3,
            "Sampler",
            [42, "randomize", 4, 1.0, 0.75],
            inputs=[slot("model", "MODEL", 2), slot("positive", "CONDITIONING", 3), slot("latent", "LATENT")],
            outputs=[out("LATENT", "LATENT", [4])],
        ),
        node(4, "Save", ["out/x"], inputs=[slot("samples", "LATENT", 4)]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 3, 0, "MODEL"], [3, 2, 0, 3, 1, "CONDITIONING"], [4, 3, 0, 4, 0, "LATENT"]]
    return {"last_node_id": 4, "last_link_id": 4, "nodes": nodes, "links": links, "groups": [], "version": 0.4}


def test_follows_links_maps_widgets_in_order_and_skips_the_seed_control_value():
    prompt = ui_to_api(base_graph(), OBJECT_INFO)
    assert prompt == {
        "1": {"inputs": {"name": "a.gguf", "dtype": "auto"}, "class_type": "Loader", "_meta": {"title": "My loader"}},
        "2": {"inputs": {"text": "a cat", "model": ["1", 0]}, "class_type": "Encode", "_meta": {"title": "Encode Text"}},
        "3": {
            "inputs": {"seed": 42, "steps": 4, "cfg": 1.0, "denoise": 0.75, "model": ["1", 0], "positive": ["2", 0]},
            "class_type": "Sampler",
            "_meta": {"title": "Sampler"},
        },
        "4": {"inputs": {"filename_prefix": "out/x", "samples": ["3", 0]}, "class_type": "Save", "_meta": {"title": "Save"}},
    }


def test_is_ui_workflow_tells_the_formats_apart():
    assert is_ui_workflow(base_graph())
    assert not is_ui_workflow(ui_to_api(base_graph(), OBJECT_INFO))


def test_control_after_generate_follows_the_input_options():
    info = {
        "N": {
            "input": {
                "required": {
                    "seed": ["INT", {"control_after_generate": False}],
                    "noise": ["INT", {"control_after_generate": True}],
                    "pick": [["p", "q"], {"control_after_generate": True}],
                    "text": ["STRING", {"forceInput": True}],
                    "flag": ["BOOLEAN", {}],
                }
            }
        }
    }
    # no input_order: dict order is used; a forced input is a socket, not a widget
    assert widget_layout(info["N"]) == [("seed", 1), ("noise", 2), ("pick", 3), ("flag", 1)]
    workflow = {"nodes": [node(1, "N", [5, 6, "fixed", "q", "fixed", "", True])], "links": []}
    assert ui_to_api(workflow, info)["1"]["inputs"] == {"seed": 5, "noise": 6, "pick": "q", "flag": True}


def test_notes_are_left_out():
    graph = base_graph()
    graph["nodes"].append(node(9, "Note", ["Use 1024x1024 for dev."]))
    graph["nodes"].append(node(10, "MarkdownNote", ["# Read me"]))
    assert set(ui_to_api(graph, OBJECT_INFO)) == {"1", "2", "3", "4"}


def test_reroute_is_passed_through():
    graph = base_graph()
    # model for the sampler now goes loader -> reroute (id 5) -> sampler
    graph["nodes"].append(node(5, "Reroute", inputs=[slot("", "*", 5)], outputs=[out("", "MODEL", [2])]))
    graph["links"][1] = [2, 5, 0, 3, 0, "MODEL"]
    graph["links"].append([5, 1, 0, 5, 0, "MODEL"])
    prompt = ui_to_api(graph, OBJECT_INFO)
    assert "5" not in prompt
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_primitive_node_value_drives_the_widget_it_is_linked_to():
    graph = base_graph()
    sampler = graph["nodes"][2]
    sampler["inputs"].append(slot("seed", "INT", 6, widget=True))
    graph["nodes"].append(node(6, "PrimitiveNode", [1234, "fixed"], outputs=[{**out("INT", "INT", [6]), "widget": {"name": "seed"}}]))
    graph["links"].append([6, 6, 0, 3, 3, "INT"])
    prompt = ui_to_api(graph, OBJECT_INFO)
    assert "6" not in prompt
    assert prompt["3"]["inputs"]["seed"] == 1234


def test_widget_converted_to_an_input_takes_the_linked_value():
    info = {**OBJECT_INFO, "Steps": {"input": {"required": {"value": ["INT", {}]}}, "display_name": "Steps"}}
    graph = base_graph()
    graph["nodes"][2]["inputs"].append(slot("steps", "INT", 7, widget=True))
    graph["nodes"].append(node(7, "Steps", [8], outputs=[out("INT", "INT", [7])]))
    graph["links"].append([7, 7, 0, 3, 3, "INT"])
    assert ui_to_api(graph, info)["3"]["inputs"]["steps"] == ["7", 0]


def lora_between_loader_and_sampler(mode):
    """Loader -> ApplyLoRA (id 5, given mode) -> Sampler.model."""
    graph = base_graph()
    graph["nodes"].append(
        node(
            5,
            "ApplyLoRA",
            ["x.safetensors", 0.8],
            inputs=[slot("model", "MODEL", 5)],
            outputs=[out("MODEL", "MODEL", [2])],
            mode=mode,
        )
    )
    graph["links"][1] = [2, 5, 0, 3, 0, "MODEL"]
    graph["links"].append([5, 1, 0, 5, 0, "MODEL"])
    return graph


def test_bypassed_node_passes_its_matching_input_through():
    prompt = ui_to_api(lora_between_loader_and_sampler(mode=4), OBJECT_INFO)
    assert "5" not in prompt
    assert prompt["3"]["inputs"]["model"] == ["1", 0]


def test_active_node_in_the_same_place_is_linked():
    prompt = ui_to_api(lora_between_loader_and_sampler(mode=0), OBJECT_INFO)
    assert prompt["5"]["inputs"] == {"lora_name": "x.safetensors", "strength": 0.8, "model": ["1", 0]}
    assert prompt["3"]["inputs"]["model"] == ["5", 0]


def test_muted_node_is_left_out_with_the_inputs_that_point_at_it():
    prompt = ui_to_api(lora_between_loader_and_sampler(mode=2), OBJECT_INFO)
    assert "5" not in prompt
    assert "model" not in prompt["3"]["inputs"]


def test_bypassed_node_with_nothing_of_the_wanted_type_drops_the_input():
    graph = lora_between_loader_and_sampler(mode=4)
    graph["nodes"][-1]["inputs"][0]["type"] = "CLIP"  # nothing of type MODEL to hand on
    assert "model" not in ui_to_api(graph, OBJECT_INFO)["3"]["inputs"]


def test_list_values_are_wrapped_so_they_are_not_read_as_links():
    info = {"N": {"input": {"required": {"choice": ["COMBO", {"multi_select": True}]}}}}
    workflow = {"nodes": [node(1, "N", [["a", "b"]])], "links": []}
    assert ui_to_api(workflow, info)["1"]["inputs"] == {"choice": {"__value__": ["a", "b"]}}


def test_link_objects_of_schema_version_1_are_understood():
    graph = base_graph()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    graph["links"] = [dict(zip(keys, link)) for link in graph["links"]]
    assert ui_to_api(graph, OBJECT_INFO) == ui_to_api(base_graph(), OBJECT_INFO)


def test_widgets_values_saved_by_name_are_mapped_by_name():
    graph = base_graph()
    graph["nodes"][0]["widgets_values"] = {"dtype": "float16", "name": "b.gguf"}
    assert ui_to_api(graph, OBJECT_INFO)["1"]["inputs"] == {"name": "b.gguf", "dtype": "float16"}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g["nodes"][2].__setitem__("widgets_values", [42, 4, 1.0, 0.75]), "widgets_values has 4 values"),
        (lambda g: g["nodes"][0].__setitem__("type", "NoSuchNode"), "unknown node type 'NoSuchNode'"),
        (lambda g: g["links"].pop(), "link 4 is used by a node but missing"),
        (lambda g: g.__setitem__("definitions", {"subgraphs": [{"id": "s"}]}), "subgraphs are not supported"),
    ],
)
def test_inconsistent_workflows_raise_a_clear_error(change, message):
    graph = base_graph()
    change(graph)
    with pytest.raises(WorkflowConvertError, match=message):
        ui_to_api(graph, OBJECT_INFO)


def test_load_images_upload_button_value_is_skipped():
    """What the frontend saves for LoadImage (ComfyUI 0.33.0's blueprints: ["example.png", "image"])."""
    info = {"LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": True}]}}}}
    workflow = {"nodes": [node(1, "LoadImage", ["example.png", "image"])], "links": []}
    assert ui_to_api(workflow, info)["1"]["inputs"] == {"image": "example.png"}
    workflow["nodes"][0]["widgets_values"] = ["example.png"]  # no button value: not what the frontend saves
    with pytest.raises(WorkflowConvertError, match="widgets_values has 1 values"):
        ui_to_api(workflow, info)


def test_other_upload_widgets_are_refused_rather_than_misread():
    info = {"LoadVideo": {"input": {"required": {"file": [["clip.mp4"], {"video_upload": True}]}}}}
    workflow = {"nodes": [node(1, "LoadVideo", ["clip.mp4", "video"])], "links": []}
    with pytest.raises(WorkflowConvertError, match="upload widget"):
        ui_to_api(workflow, info)
