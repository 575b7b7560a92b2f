"""The vision-endpoint caption client against a local stub server (tests/caption_stub.py): real
HTTP and JSON on a loopback port; no test needs the internet."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from caption_stub import CaptionStub
from PIL import Image

from lora_ops import captioning as cap

SECRET = "sk-test-4f9c2e7a1b"
KEY_VAR = "FLUXQ_TEST_API_KEY"


@pytest.fixture
def stub():
    server = CaptionStub()
    yield server
    server.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_VAR, SECRET)


def captioner(stub, key_variable=KEY_VAR, **settings):
    retry = dict(max_retries=settings.pop("max_retries", 3), backoff_s=settings.pop("backoff_s", 0.05))
    return cap.VisionCaptioner(cap.EndpointSettings(base_url=stub.base_url, model=stub.model, **settings),
                               key_variable, **retry)


def red(size=(1600, 800)):
    return Image.new("RGB", size, (230, 20, 20))


def test_success_sends_the_image_the_instruction_and_the_key(stub, key):
    text = captioner(stub, temperature=0.3, max_tokens=77).caption(red())
    assert text == "a plain red square"
    (request,) = stub.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == f"Bearer {SECRET}"
    assert request["colour"] == "red" and request["size"] == (1024, 512)  # long side capped for upload
    body = request["body"]
    assert body["model"] == stub.model and body["temperature"] == 0.3 and body["max_tokens"] == 77
    assert body["messages"][0]["content"][0] == {"type": "text", "text": cap.DEFAULT_INSTRUCTION}


def test_no_key_variable_sends_no_authorization(stub, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert captioner(stub, key_variable="OPENAI_API_KEY").caption(red()) == "a plain red square"
    assert captioner(stub, key_variable="").caption(red()) == "a plain red square"
    assert [r["authorization"] for r in stub.requests] == [None, None]


def test_429_waits_as_long_as_retry_after_says(stub, key):
    stub.script = [("status", 429, {"Retry-After": "1"}), ("status", 429, {"Retry-After": "0"})]
    started = time.monotonic()
    assert captioner(stub, backoff_s=5.0).caption(red()) == "a plain red square"
    gaps = [b["time"] - a["time"] for a, b in zip(stub.requests, stub.requests[1:])]
    # honoured (1 s, then at once) rather than the 5 s / 10 s backoff
    assert len(gaps) == 2 and 1.0 <= gaps[0] < 2.5 and gaps[1] < 1.0
    assert time.monotonic() - started < 4


def test_server_errors_are_retried_with_backoff_then_reported(stub, key):
    stub.script = [("status", 503), ("status", 500)]
    assert captioner(stub).caption(red()) == "a plain red square"
    assert len(stub.requests) == 3

    stub.requests.clear()
    stub.script = [("status", 502, {}, {"error": {"message": "upstream down"}})] * 3
    with pytest.raises(cap.CaptionError, match="failed 3 times: HTTP 502 upstream down") as error:
        captioner(stub, max_retries=2).caption(red())
    assert not error.value.fatal and len(stub.requests) == 3


def test_timeout_is_retried_then_reported(stub, key):
    stub.script = [("sleep", 1.0)] * 2
    with pytest.raises(cap.CaptionError, match="no answer within 0.3 s") as error:
        captioner(stub, timeout_s=0.3, max_retries=1).caption(red())
    assert not error.value.fatal


@pytest.mark.parametrize("body,message", [
    (b"<html>gateway</html>", "malformed reply"),
    (b'{"choices": []}', "malformed reply"),
    (b'{"choices": [{"message": {"content": null}}]}', "malformed reply"),
    (b'{"choices": [{"message": {"content": "  "}}]}', "empty caption"),
])
def test_malformed_replies_are_per_image_errors(stub, key, body, message):
    stub.script = [("malformed", body)]
    with pytest.raises(cap.CaptionError, match=message) as error:
        captioner(stub).caption(red())
    assert not error.value.fatal and len(stub.requests) == 1  # not paid for again


def test_replies_are_cleaned_to_one_line():
    assert cap.clean_caption('<think>hmm\nred?</think>\n"A red square\n on white."') == "A red square on white."


def test_unreachable_host_stops_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = cap.VisionCaptioner(cap.EndpointSettings(base_url=f"http://127.0.0.1:{port}/v1", model="m"), "",
                                 backoff_s=5.0)
    started = time.monotonic()
    with pytest.raises(cap.EndpointError, match=f"cannot reach endpoint http://127.0.0.1:{port}/v1/chat/completions") as error:
        client.caption(red())
    assert error.value.fatal and time.monotonic() - started < 2


@pytest.mark.parametrize("status,message", [
    (401, "HTTP 401: the key from FLUXQ_TEST_API_KEY was refused"),
    (403, "HTTP 403: the key from FLUXQ_TEST_API_KEY was refused"),
    (404, "HTTP 404: check the base URL"),
])
def test_refusals_name_endpoint_and_model_never_the_key(stub, key, caplog, status, message):
    # OpenAI's 401 body quotes part of the key: it must not reach the message
    stub.script = [("status", status, {}, {"error": {"message": f"Incorrect API key provided: {SECRET}"}})]
    with caplog.at_level(logging.DEBUG), pytest.raises(cap.EndpointError, match=message) as error:
        captioner(stub).caption(red())
    text = str(error.value)
    assert error.value.fatal and stub.base_url in text and repr(stub.model) in text
    assert SECRET not in text and SECRET not in caplog.text and SECRET[-6:] not in text


def test_the_key_never_appears_in_errors_or_logs(stub, key, caplog):
    stub.script = [("status", 500, {}, {"error": {"message": f"echo {SECRET}"}})] * 2 + [("malformed", SECRET.encode())]
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(cap.CaptionError) as first:
            captioner(stub, max_retries=1).caption(red())
        with pytest.raises(cap.CaptionError) as second:
            captioner(stub).caption(red())
    for text in (str(first.value), str(second.value), caplog.text):
        assert SECRET not in text
    assert "[key]" in str(first.value) and "[key]" in str(second.value)


@pytest.mark.parametrize("variable,url,message", [
    ("AWS_SECRET_ACCESS_KEY", "https://api.example.com/v1", "ends in API_KEY"),
    ("HOME", "https://api.example.com/v1", "ends in API_KEY"),
    (KEY_VAR, "file:///etc/passwd", "http:// or https://"),
    (KEY_VAR, "http://api.example.com/v1", "refusing to send the key"),
])
def test_unsafe_settings_are_refused_before_any_request(key, variable, url, message):
    with pytest.raises(cap.EndpointError, match=message) as error:
        cap.VisionCaptioner(cap.EndpointSettings(base_url=url, model="m"), variable)
    assert SECRET not in str(error.value)


def test_key_over_plain_http_is_allowed_to_local_servers(key):
    for url in ("http://127.0.0.1:1234/v1", "http://localhost:11434/v1", "http://192.168.1.20:8000/v1"):
        cap.VisionCaptioner(cap.EndpointSettings(base_url=url, model="m"), KEY_VAR)


def test_redirects_are_not_followed(stub, key):
    stub.script = [("status", 307, {"Location": "http://127.0.0.1:9/v1/chat/completions"})]
    with pytest.raises(cap.EndpointError, match="redirects"):
        captioner(stub).caption(red())


def test_retry_after_parses_seconds_and_dates():
    assert cap._retry_after("2") == 2.0 and cap._retry_after(None) is None and cap._retry_after("soon") is None
    import email.utils

    assert 8 < cap._retry_after(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10
