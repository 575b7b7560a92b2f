"""FluxQPrepareDataset in a real ComfyUI server (template and vision-endpoint captions, the stub
endpoint of tests/caption_stub.py on a loopback port) and in-process for the API key's secrecy."""

from __future__ import annotations

import importlib
import logging
import uuid

import numpy as np
import pytest
import torch
from caption_stub import CaptionStub
from fluxq_testing import node_class_for_prompt
from PIL import Image

from comfy_server import ExecutionFailed

SECRET = "sk-node-test-9d8e7f6a5b"


def photo(seed: int, size=(320, 256)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def colour(rgb, size=(256, 256)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def write_source(folder):
    """A mixed folder: JPEG with a caption, a kohya repeat folder, a duplicate, a thumbnail, a note."""
    (folder / "3_red").mkdir(parents=True)
    colour((230, 20, 20)).save(folder / "3_red" / "r.jpg", quality=95)
    colour((20, 30, 230)).save(folder / "b.png")
    (folder / "b.txt").write_text("my own blue caption")
    colour((20, 30, 230)).save(folder / "b_again.bmp")  # same pixels as b.png
    photo(1, (100, 80)).save(folder / "thumb.png")
    (folder / "readme.md").write_text("not an image")


def prepare_inputs(source, **overrides):
    inputs = dict(
        source=source, output_name="", min_side=128, max_side=2048, background="white", caption_mode="keep",
        captioner="template", trigger_word="TOK", trigger_placement="start", caption_prefix="", caption_suffix="",
        template="a photo of {trigger}", endpoint_url="https://api.openai.com/v1", model="gpt-4o-mini",
        api_key_env="OPENAI_API_KEY", instruction="Describe the image.", temperature=0.2, max_tokens=120,
        concurrency=2, timeout=30.0, on_caption_error="fail",
    )
    inputs.update(overrides)
    return inputs


@pytest.fixture(scope="module")
def stub():
    server = CaptionStub()
    yield server
    server.close()


def run_prepare(comfy_server, source, **overrides):
    history = comfy_server.run({"prep": {"class_type": "FluxQPrepareDataset", "inputs": prepare_inputs(source, **overrides)}})
    return history["outputs"]["prep"]["text"][0]


def captions(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text().strip() for p in sorted(folder.rglob("*.txt"))}


@pytest.mark.server
def test_server_prepares_a_mixed_folder_with_template_captions(comfy_server):
    source = f"photos_{uuid.uuid4().hex[:6]}"
    write_source(comfy_server.input_dir / source)
    report = run_prepare(comfy_server, source, caption_mode="fill")
    out = comfy_server.input_dir / f"{source}_prepared"
    assert report.splitlines()[0] == f"{source}_prepared"
    for line in ("images written: 2", "exact duplicates dropped: 1 (b_again.bmp = b.png)",
                 "below min_side dropped: 1 (thumb.png 100x80)", "other files ignored: 1 (readme.md)",
                 "captions kept: 1", "captions from the template: 1"):
        assert line in report
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["3_red/r.png", "b.png"]
    assert captions(out) == {"3_red/r.txt": "a photo of TOK", "b.txt": "my own blue caption"}
    assert (comfy_server.input_dir / source / "3_red" / "r.jpg").is_file()  # originals untouched

    # the new folder is offered to the trainer and the node itself at the next /object_info
    info = comfy_server.get("/object_info/FluxQTrainLoRA")["FluxQTrainLoRA"]["input"]
    assert f"{source}_prepared" in info["required"]["dataset"][1]["options"]
    assert "dataset_name" in info["optional"]


@pytest.mark.server
def test_server_captions_through_an_openai_compatible_endpoint(comfy_server, stub):
    source = f"photos_{uuid.uuid4().hex[:6]}"
    write_source(comfy_server.input_dir / source)
    stub.requests.clear()
    stub.script = [("status", 429, {"Retry-After": "0"})]
    endpoint = dict(captioner="openai-compatible", endpoint_url=stub.base_url, model=stub.model, api_key_env="",
                    trigger_placement="end", caption_prefix="photo:")
    report = run_prepare(comfy_server, source, caption_mode="overwrite", **endpoint)
    out = comfy_server.input_dir / f"{source}_prepared"
    assert captions(out) == {"3_red/r.txt": "photo: a plain red square, TOK", "b.txt": "photo: a plain blue square, TOK"}
    assert "captions generated: 2" in report
    assert len(stub.requests) == 3 and all(r["authorization"] is None for r in stub.requests)

    # a new source image: the rerun asks only for it
    colour((20, 220, 30)).save(comfy_server.input_dir / source / "g.png")
    report = run_prepare(comfy_server, source, caption_mode="overwrite", **endpoint)
    assert "captions reused from an earlier run: 2" in report and "captions generated: 1" in report
    assert len(stub.requests) == 4 and stub.requests[-1]["colour"] == "green"
    assert captions(out)["g.txt"] == "photo: a plain green square, TOK"

    stub.script = [("malformed", b"<html>")]
    with pytest.raises(ExecutionFailed, match="malformed reply"):
        run_prepare(comfy_server, source, caption_mode="overwrite", **{**endpoint, "instruction": "other"})
    stub.script = [("malformed", b"<html>")]
    report = run_prepare(comfy_server, source, caption_mode="overwrite", on_caption_error="skip",
                         **{**endpoint, "instruction": "other"})
    assert "captions failed (left without): 1" in report
    # a model the endpoint does not have stops the run whatever the policy
    with pytest.raises(ExecutionFailed, match="HTTP 404: check the base URL"):
        run_prepare(comfy_server, source, caption_mode="overwrite", on_caption_error="skip",
                    **{**endpoint, "instruction": "again", "model": "missing-model"})


@pytest.mark.server
@pytest.mark.parametrize("overrides,message", [
    (dict(output_name="../escape"), "must be a plain folder name"),
    # 0.33 refuses a value outside a combo's list itself; 0.3.75 leaves it to the node
    (dict(source="../"), "not a folder or archive inside the input folder|Value not in list"),
    (dict(caption_mode="fill", captioner="openai-compatible", api_key_env="HOME"), "ends in API_KEY"),
    (dict(caption_mode="fill", captioner="openai-compatible", endpoint_url="file:///etc/passwd"), "http:// or https://"),
])
def test_server_refuses_bad_settings_with_a_clear_message(comfy_server, overrides, message):
    source = f"photos_{uuid.uuid4().hex[:6]}"
    write_source(comfy_server.input_dir / source)
    with pytest.raises(ExecutionFailed, match=message):
        run_prepare(comfy_server, overrides.pop("source", source), **overrides)


# --- in-process: the API key ---------------------------------------------------------------------


def test_the_key_is_sent_to_the_endpoint_and_nowhere_else(pack, stub, tmp_path, monkeypatch, caplog):
    import folder_paths

    node_class = importlib.import_module(f"{pack.__name__}.nodes.prepare").FluxQPrepareDataset
    monkeypatch.setenv("FLUXQ_NODE_TEST_API_KEY", SECRET)
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        write_source(tmp_path / "src")
        inputs = prepare_inputs("src", caption_mode="overwrite", captioner="openai-compatible",
                                endpoint_url=stub.base_url, model=stub.model, api_key_env="FLUXQ_NODE_TEST_API_KEY")
        node = node_class_for_prompt(node_class, "5")
        stub.requests.clear()
        stub.script = [("status", 500, {}, {"error": {"message": f"echo {SECRET}"}})]
        with caplog.at_level(logging.DEBUG), torch.inference_mode():
            out = node.execute(**inputs)
            stub.script = [("status", 401, {}, {"error": {"message": f"Incorrect API key provided: {SECRET}"}})]
            with pytest.raises(Exception) as refused:
                node.execute(**{**inputs, "instruction": "again"})
    finally:
        folder_paths.set_input_directory(old_input)
    assert out.result[0] == "src_prepared" and "captions generated: 2" in out.result[1]
    assert {r["authorization"] for r in stub.requests} == {f"Bearer {SECRET}"}
    assert "HTTP 401: the key from FLUXQ_NODE_TEST_API_KEY was refused" in str(refused.value)
    texts = [str(refused.value), caplog.text, repr(out.result), repr(inputs)]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert not [t for t in texts if SECRET in t or SECRET[-6:] in t]
