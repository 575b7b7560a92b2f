"""The vision-endpoint caption client against a local stub server (tests/caption_stub.py): real
HTTP and JSON on a loopback port; no test needs the internet."""

from __future__ import annotations

import logging
import socket
import threading
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
    monkeypatch.setenv(cap.HOSTS_VARIABLE, "127.0.0.1")  # the stub's host, approved for the key


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


def test_timeout_bounds_the_whole_reply_not_each_read(stub, key):
    # a reply that keeps trickling in resets a per-read timeout forever
    stub.script = [("trickle", 6.0)]
    started = time.monotonic()
    with pytest.raises(cap.CaptionError, match="failed 1 times: no answer within 1 s"):
        captioner(stub, timeout_s=1.0, max_retries=0).caption(red())
    assert time.monotonic() - started < 2.5


def test_a_retry_after_longer_than_timeout_fails_the_image_at_once(stub, key):
    stub.script = [("status", 429, {"Retry-After": "30"}, {"error": {"message": "slow down"}})]
    started = time.monotonic()
    with pytest.raises(cap.CaptionError, match=r"HTTP 429 slow down and asks to wait 30 s \(Retry-After\), longer "
                                               r"than timeout \(5 s\)") as error:
        captioner(stub, timeout_s=5.0).caption(red())
    assert not error.value.fatal and len(stub.requests) == 1 and time.monotonic() - started < 1


@pytest.mark.parametrize("script", [[("status", 503, {"Retry-After": "20"})] * 3, [("sleep", 20.0)], [("trickle", 20.0)]],
                         ids=["retry-after", "silent", "trickle"])
def test_abort_ends_a_call_at_once_whatever_it_waits_on(stub, key, script):
    stub.script = script
    client = captioner(stub, timeout_s=30.0, backoff_s=20.0)
    outcome = []

    def call():
        try:
            outcome.append(client.caption(red()))
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 5
    while not stub.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the worker is now inside the wait or the read
    started = time.monotonic()
    client.abort()
    worker.join(5)
    assert not worker.is_alive() and time.monotonic() - started < 1
    assert isinstance(outcome[0], InterruptedError) and len(stub.requests) == 1


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
    (KEY_VAR, "https://127.0.0.1:port/v1", "http:// or https://"),
    (KEY_VAR, "http://api.example.com/v1", "refusing to send the key"),  # approved, but not over plain http
    (KEY_VAR, "https://api.example.org/v1", "key from FLUXQ_TEST_API_KEY is only sent to the hosts in "
                                            "FLUXQ_CAPTION_HOSTS, not to the endpoint host api.example.org"),
])
def test_unsafe_settings_are_refused_before_any_request(key, monkeypatch, variable, url, message):
    monkeypatch.setenv(cap.HOSTS_VARIABLE, "api.example.com")
    with pytest.raises(cap.EndpointError, match=message) as error:
        cap.VisionCaptioner(cap.EndpointSettings(base_url=url, model="m"), variable)
    assert SECRET not in str(error.value)


def test_key_over_plain_http_is_allowed_to_local_servers(key, monkeypatch):
    monkeypatch.setenv(cap.HOSTS_VARIABLE, "127.0.0.1, localhost:11434,192.168.1.20")
    for url in ("http://127.0.0.1:1234/v1", "http://localhost:11434/v1", "http://192.168.1.20:8000/v1"):
        cap.VisionCaptioner(cap.EndpointSettings(base_url=url, model="m"), KEY_VAR)


# --- where images and keys may go: the owner's approval, never the workflow's ------------------------

ALLOWED, REFUSED = "allowed", "refused"


@pytest.mark.parametrize("url,variable,sends_key,hosts,expected", [
    # a key goes to its provider's host, and only there unless the owner lists more
    ("https://api.openai.com/v1", "OPENAI_API_KEY", True, "", ALLOWED),
    ("https://API.OpenAI.com./v1", "openai_api_key", True, "", ALLOWED),
    ("https://openrouter.ai/api/v1", "OPENAI_API_KEY", True, "", REFUSED),
    ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY", True, "", ALLOWED),
    ("https://api.openai.com.evil.example/v1", "OPENAI_API_KEY", True, "", REFUSED),
    ("https://evil.example/v1", "OPENAI_API_KEY", True, "", REFUSED),
    ("https://captions.invalid/v1", "MY_API_KEY", True, "", REFUSED),  # resolves nowhere: refused by name
    # an approved non-loopback host, with or without a port in the entry
    ("https://llm.corp.example/v1", "OPENAI_API_KEY", True, "llm.corp.example", ALLOWED),
    ("https://llm.corp.example:8443/v1", "MY_API_KEY", True, "other.example, llm.corp.example:8443", ALLOWED),
    ("https://llm.corp.example:9000/v1", "MY_API_KEY", True, "llm.corp.example:8443", REFUSED),
    ("https://llm.corp.example/v1", "MY_API_KEY", True, "llm.corp.example:443", ALLOWED),
    ("http://[::1]:8080/v1", "MY_API_KEY", True, "[::1]", ALLOWED),
    # loopback needs no approval for images, but a key still needs one (any local user can listen there)
    ("http://localhost:11434/v1", "OPENAI_API_KEY", False, "", ALLOWED),
    ("http://127.0.0.1:1234/v1", "", False, "", ALLOWED),
    ("http://[::1]:8080/v1", "", False, "", ALLOWED),
    ("http://localhost:11434/v1", "OPENAI_API_KEY", True, "", REFUSED),
    ("http://127.0.0.1:1234/v1", "MY_API_KEY", True, "localhost", REFUSED),
    # images alone: providers and listed hosts; a LAN server or a stranger needs the owner's listing
    ("https://api.openai.com/v1", "", False, "", ALLOWED),
    ("http://192.168.1.20:8000/v1", "", False, "", REFUSED),
    ("http://192.168.1.20:8000/v1", "", False, "192.168.1.20", ALLOWED),
    ("https://evil.example/v1", "", False, "", REFUSED),
    ("https://localhost.evil.example/v1", "", False, "", REFUSED),
])
def test_endpoint_host_policy(url, variable, sends_key, hosts, expected):
    environ = {cap.HOSTS_VARIABLE: hosts}
    if expected == ALLOWED:
        cap.check_endpoint_host(url, variable, sends_key, environ)
        return
    with pytest.raises(cap.EndpointError, match="not approved|is only sent to") as error:
        cap.check_endpoint_host(url, variable, sends_key, environ)
    host = url.split("//")[1].split("/")[0]
    assert host.lower().rstrip(".") in str(error.value) and cap.HOSTS_VARIABLE in str(error.value)


def test_a_bad_allow_list_entry_is_named():
    with pytest.raises(cap.EndpointError, match="FLUXQ_CAPTION_HOSTS entry 'https://x.example/v1' is not a host"):
        cap.check_endpoint_host("https://x.example/v1", "", False, {cap.HOSTS_VARIABLE: "https://x.example/v1"})


def test_a_refused_host_opens_no_connection_and_resolves_nothing(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv(cap.HOSTS_VARIABLE, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(cap.EndpointError, match="only sent to api.openai.com and the hosts in FLUXQ_CAPTION_HOSTS, "
                                                "not to the endpoint host captions.invalid"):
        cap.VisionCaptioner(cap.EndpointSettings(base_url="https://captions.invalid/v1", model="m"), "OPENAI_API_KEY")


def test_redirects_are_not_followed(stub, key):
    stub.script = [("status", 307, {"Location": "http://127.0.0.1:9/v1/chat/completions"})]
    with pytest.raises(cap.EndpointError, match="redirects"):
        captioner(stub).caption(red())


def test_retry_after_parses_seconds_and_dates():
    assert cap._retry_after("2") == 2.0 and cap._retry_after(None) is None and cap._retry_after("soon") is None
    import email.utils

    assert 8 < cap._retry_after(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10
