"""Fuzzing the UI->API workflow converter (structurally mutated workflows: any value replaced by any
JSON, keys deleted, nodes duplicated, long reroute chains and cycles) and the grid's strength/seed
lists. Property: a prompt or WorkflowConvertError / GridInputError, nothing else, within the bounds."""

from __future__ import annotations

import copy
import json

from fuzz_support import bounded, expect_only, fuzz_settings
from hypothesis import example, given
from hypothesis import strategies as st
from test_workflow_convert import OBJECT_INFO, base_graph, node, slot

from lora_ops import grid
from lora_ops.workflow_convert import WorkflowConvertError, is_ui_workflow, ui_to_api

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10) | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from json_paths(child, (*prefix, index))


@st.composite
def mutated_workflow(draw):
    workflow = base_graph()
    if draw(st.booleans()):  # a reroute and a bypassed node on the way, as real workflows have
        workflow["nodes"].append(node(5, "Reroute", inputs=[slot("", "*", 5)], outputs=[{"name": "", "type": "MODEL", "links": [2]}]))
        workflow["links"][1] = [2, 5, 0, 3, 0, "MODEL"]
        workflow["links"].append([5, 1, 0, 5, 0, "MODEL"])
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in json_paths(workflow) if p]
        path = draw(st.sampled_from(paths))
        parent = workflow
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(("replace", "delete", "duplicate", "swap_type")))
        if kind == "replace":
            parent[path[-1]] = draw(json_values)
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        elif kind == "swap_type":
            parent[path[-1]] = draw(st.sampled_from(("Reroute", "PrimitiveNode", "Note", 4, 2, None, "Unknown", [])))
    return workflow


def check_convert(workflow) -> None:
    size = len(json.dumps(workflow, default=str))
    assert isinstance(is_ui_workflow(workflow), bool)
    outcome = bounded(ui_to_api, size, workflow, OBJECT_INFO)
    expect_only(outcome, WorkflowConvertError)
    if outcome.error is None:
        for node_id, entry in outcome.result.items():
            assert entry["class_type"] in OBJECT_INFO and isinstance(entry["inputs"], dict)
            assert isinstance(entry["_meta"]["title"], str)


@fuzz_settings(ci_examples=300)
@given(mutated_workflow())
def test_mutated_workflows_convert_or_are_refused(workflow):
    check_convert(workflow)


@fuzz_settings(ci_examples=100)
@given(json_values)
@example({"nodes": [1]})
@example({"nodes": [], "links": [[1]]})
def test_any_json_converts_or_is_refused(value):
    check_convert(value if isinstance(value, dict) else {"nodes": value})


@fuzz_settings(ci_examples=20)
@given(length=st.sampled_from((1, 10, 900, 3000)), cycle=st.booleans())
def test_long_reroute_chains_and_cycles(length, cycle):
    """Each reroute is one more link to follow: no recursion limit, no quadratic bookkeeping."""
    workflow = base_graph()
    first_reroute = 100
    for index in range(length):
        node_id, link_id = first_reroute + index, 1000 + index
        source = 1 if index == 0 else node_id - 1
        workflow["nodes"].append(node(node_id, "Reroute", inputs=[slot("", "*", link_id)], outputs=[{"name": "", "type": "*"}]))
        workflow["links"].append([link_id, source, 0, node_id, 0, "*"])
    if cycle:  # the first reroute's input comes from the last one
        workflow["links"][-length] = [1000, first_reroute + length - 1, 0, first_reroute, 0, "*"]
    workflow["links"][1] = [2, first_reroute + length - 1, 0, 3, 0, "MODEL"]
    outcome = bounded(ui_to_api, len(json.dumps(workflow)), workflow, OBJECT_INFO)
    expect_only(outcome, WorkflowConvertError, "cycle")
    assert (outcome.error is not None) == cycle
    if not cycle:
        assert outcome.result["3"]["inputs"]["model"] == ["1", 0]


# --- the grid's lists ------------------------------------------------------------------------

list_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(("0", "0.5", "-1", "1e400", "nan", "inf", "-0", "1_0", "\u0661", "0x10", "18446744073709551616",
                              "9" * 5000, "1" * 20, "", ",", ";", " ", "\t", "\u3000")), max_size=12).map(" ".join),
)


@fuzz_settings(ci_examples=300)
@given(strengths=list_text, seeds=list_text, b=st.sampled_from((None, "a.safetensors", "b.safetensors")),
       baseline=st.booleans())
@example(strengths="1", seeds="9" * 5000, b=None, baseline=False)  # found: int() refused 4,300+ digits with ValueError
@example(strengths="9" * 9000, seeds="0", b=None, baseline=False)  # found: the decimal-comma search was quadratic
def test_grid_lists_parse_or_are_refused(strengths, seeds, b, baseline):
    size = len(strengths) + len(seeds) + 1
    for call, text in ((grid.parse_strengths, strengths), (grid.parse_seeds, seeds)):
        expect_only(bounded(call, size, text), grid.GridInputError)
    outcome = bounded(grid.plan_grid, size, strengths, seeds, "a.safetensors", b, baseline)
    expect_only(outcome, grid.GridInputError)
    if outcome.error is None:
        plan = outcome.result
        assert 1 <= plan.cell_count <= grid.MAX_CELLS
        assert all(0 <= seed <= grid.MAX_SEED for seed in plan.seeds)
