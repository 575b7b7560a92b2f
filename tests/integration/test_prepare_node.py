"""FluxQPrepareDataset in a real ComfyUI server (template and vision-endpoint captions, the stub
endpoint of tests/caption_stub.py on a loopback port) and in-process for the API key's secrecy."""

from __future__ import annotations

import importlib
import io
import logging
import time
import uuid
import zipfile

import numpy as np
import pytest
import torch
from caption_stub import SERVER_API_KEY, SERVER_API_KEY_VARIABLE, CaptionStub
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


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.server
def test_server_preparation_never_overwrites_a_photo_or_an_edit(comfy_server):
    source = f"names_{uuid.uuid4().hex[:6]}"
    folder = comfy_server.input_dir / source
    folder.mkdir()
    # three different photos whose names differ only in case
    for n, ext in enumerate(("jpg", "JPG", "Jpg")):
        (folder / f"IMG_1.{ext}").write_bytes(jpeg(photo(100 + n)))
    report = run_prepare(comfy_server, source, caption_mode="fill")
    out = comfy_server.input_dir / f"{source}_prepared"
    assert sorted(p.name for p in out.glob("*.png")) == ["IMG_1.png", "IMG_1_jpg.png", "IMG_1_jpg_2.png"]
    assert "images written: 3" in report

    # the user edits a caption in the prepared folder; a rerun that writes every caption anew keeps it
    (out / "IMG_1_jpg.txt").write_text("TOK, my own words\n")
    report = run_prepare(comfy_server, source, caption_mode="overwrite", template="new {trigger}")
    assert captions(out) == {"IMG_1.txt": "new TOK", "IMG_1_jpg.txt": "TOK, my own words", "IMG_1_jpg_2.txt": "new TOK"}
    assert "captions edited in the prepared folder kept: 1 (IMG_1_jpg.txt)" in report
    # an image added there by hand is not lost either: the rerun stops and names it
    photo(110).save(out / "extra.png")
    with pytest.raises(ExecutionFailed, match=r"holds changes a rerun would lose: extra.png \(not written by"):
        run_prepare(comfy_server, source, caption_mode="overwrite", template="newer {trigger}")
    (out / "extra.png").unlink()

    # an archive of the same name defaults to the same folder: refused, not swapped in
    members = [(f"IMG_1.{ext}", jpeg(photo(120 + n))) for n, ext in enumerate(("Jpg", "JPG", "jpg", "jpeg"))]
    with zipfile.ZipFile(comfy_server.input_dir / f"{source}.zip", "w") as z:
        for name, data in members:  # not in name order
            z.writestr(name, data)
    with pytest.raises(ExecutionFailed, match=f"'{source}_prepared' was prepared from '{source}', not from "
                                              f"'{source}.zip'"):
        run_prepare(comfy_server, f"{source}.zip", caption_mode="fill")
    assert captions(out)["IMG_1_jpg.txt"] == "TOK, my own words"
    report = run_prepare(comfy_server, f"{source}.zip", output_name=f"{source}_zip", caption_mode="fill")
    assert "images written: 4" in report and len(list((comfy_server.input_dir / f"{source}_zip").glob("*.png"))) == 4


@pytest.mark.server
def test_server_reads_a_caption_that_is_not_utf8_and_says_so(comfy_server):
    source = f"notepad_{uuid.uuid4().hex[:6]}"
    (comfy_server.input_dir / source).mkdir()
    photo(130).save(comfy_server.input_dir / source / "a.png")
    (comfy_server.input_dir / source / "a.txt").write_bytes("une photo de café".encode("cp1252"))  # Notepad's
    report = run_prepare(comfy_server, source)
    assert "captions not in UTF-8, converted: 1 (a.txt read as Windows-1252)" in report
    out = comfy_server.input_dir / f"{source}_prepared"
    assert (out / "a.txt").read_text(encoding="utf-8").strip() == "une photo de café"


@pytest.mark.server
@pytest.mark.parametrize("script", [[("status", 429, {"Retry-After": "30"})] * 20, [("sleep", 40.0)] * 20],
                         ids=["retry-after", "slow-endpoint"])
def test_server_cancel_while_captioning_ends_the_node_at_once(comfy_server, stub, script):
    source = f"cancel_{uuid.uuid4().hex[:6]}"
    write_source(comfy_server.input_dir / source)
    stub.requests.clear()
    stub.script = list(script)
    prompt = {"prep": {"class_type": "FluxQPrepareDataset", "inputs": prepare_inputs(
        source, caption_mode="overwrite", captioner="openai-compatible", endpoint_url=stub.base_url, model=stub.model,
        api_key_env="", timeout=60.0)}}
    status, body = comfy_server.post_prompt(prompt)
    assert status == 200, body
    deadline = time.monotonic() + 60
    while len(stub.requests) < 2 and time.monotonic() < deadline:  # both images are being asked for
        time.sleep(0.05)
    time.sleep(0.5)  # now waiting out the Retry-After, or for the reply
    started = time.monotonic()
    comfy_server.post("/interrupt", {"prompt_id": body["prompt_id"]})
    entry = comfy_server.wait(body["prompt_id"], timeout=20)  # today's retry budget: minutes
    assert time.monotonic() - started < 5
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    assert len(stub.requests) == 2  # nothing asked after the cancel
    stub.script.clear()
    # the queue is free again
    assert run_prepare(comfy_server, source, caption_mode="fill").startswith(f"{source}_prepared")


@pytest.mark.server
def test_server_sends_images_and_keys_only_to_hosts_its_owner_approved(comfy_server, stub):
    """The server starts with FLUXQ_CAPTION_HOSTS=127.0.0.1 (the stub's host) and a key variable
    (tests/conftest.py); no workflow input can widen that."""
    source = f"hosts_{uuid.uuid4().hex[:6]}"
    write_source(comfy_server.input_dir / source)
    out = comfy_server.input_dir / f"{source}_prepared"
    endpoint = dict(caption_mode="overwrite", captioner="openai-compatible", model=stub.model)
    port = stub.base_url.split(":")[-1].split("/")[0]
    stub.requests.clear()
    refused = [
        # a stranger's host (this one resolves nowhere) with the key, and without it (the photos)
        (dict(endpoint_url="https://captions.invalid/v1", api_key_env=SERVER_API_KEY_VARIABLE),
         f"the key from {SERVER_API_KEY_VARIABLE} is only sent to the hosts in FLUXQ_CAPTION_HOSTS, not to the "
         "endpoint host captions.invalid"),
        (dict(endpoint_url="https://captions.invalid/v1", api_key_env=""),
         "endpoint host captions.invalid is not approved: images are only sent to"),
        # loopback needs no approval for images, but the key goes only where approved
        (dict(endpoint_url=f"http://localhost:{port}/v1", api_key_env=SERVER_API_KEY_VARIABLE),
         f"not to the endpoint host localhost:{port}: clear api_key_env for a local server"),
    ]
    for inputs, message in refused:
        started = time.monotonic()
        with pytest.raises(ExecutionFailed) as error:
            run_prepare(comfy_server, source, **endpoint, **inputs)
        assert message in str(error.value) and "FLUXQ_CAPTION_HOSTS" in str(error.value)
        assert time.monotonic() - started < 10  # no DNS lookups, no retries
        assert not out.exists()  # refused before any image was read
    assert stub.requests == []

    # the approved loopback host gets the key; without a key, loopback needs no approval
    report = run_prepare(comfy_server, source, **endpoint, endpoint_url=stub.base_url, api_key_env=SERVER_API_KEY_VARIABLE)
    assert "captions generated: 2" in report
    assert [r["authorization"] for r in stub.requests] == [f"Bearer {SERVER_API_KEY}"] * 2
    report = run_prepare(comfy_server, source, **endpoint, endpoint_url=f"http://localhost:{port}/v1", api_key_env="",
                         instruction="again")
    assert "captions generated: 2" in report and [r["authorization"] for r in stub.requests[2:]] == [None, None]


# --- in-process: the API key ---------------------------------------------------------------------


def test_the_key_is_sent_to_the_endpoint_and_nowhere_else(pack, stub, tmp_path, monkeypatch, caplog):
    import folder_paths

    node_class = importlib.import_module(f"{pack.__name__}.nodes.prepare").FluxQPrepareDataset
    monkeypatch.setenv("FLUXQ_NODE_TEST_API_KEY", SECRET)
    monkeypatch.setenv("FLUXQ_CAPTION_HOSTS", "127.0.0.1")  # the stub's host, approved for the key
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
