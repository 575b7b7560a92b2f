"""Captions from an OpenAI-compatible vision chat endpoint (`POST {base_url}/chat/completions`).

OpenAI, and local servers that speak the same protocol (Ollama, LM Studio, vLLM, llama.cpp's
server), take the image as a base64 data URL in a user message. HTTP is the standard library's
urllib: one JSON POST per image needs nothing more.

The API key comes only from an environment variable whose name ends in API_KEY (so a shared
workflow cannot name another secret); it is sent as a bearer header and kept out of every message,
log line and file. Without the variable (or with an empty name) no key is sent, which is what
local servers expect.

Where images and the key may go is decided outside any workflow (`check_endpoint_host`): a
workflow names the endpoint, so a shared one could name a stranger's server. Images go to loopback
hosts, the known providers' hosts and the hosts the server's owner lists in FLUXQ_CAPTION_HOSTS; a
key goes only to its provider's host (OPENAI_API_KEY: api.openai.com) and the listed hosts.

Every request can be cut off from another thread (its socket is shut down): cancel ends a run at
once, even while a slow server is still answering, and `timeout` bounds a whole reply, not just
each read, so one image takes at most (2 * MAX_RETRIES + 1) * timeout.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass

from PIL import Image

from .errors import user_facing

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_KEY_VARIABLE = "OPENAI_API_KEY"
# FLUX was trained on natural-language captions (T5), not tag lists.
DEFAULT_INSTRUCTION = (
    "Describe this image in one or two natural English sentences for training an image model: the main "
    "subject, what it is doing, the setting, the lighting and the style or medium. Plain prose only: no "
    "lists, no tags, no preamble, no quotation marks."
)
MAX_RETRIES = 5  # after the first attempt, for 429, 5xx and timeouts; each pause is at most `timeout`
IMAGE_LONG_SIDE = 1024  # vision models see at most about this much; smaller uploads are faster
KEY_VARIABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*_)?API_KEY$", re.IGNORECASE)
# The host each provider's key variable belongs to (their OpenAI-compatible endpoints): without the
# owner's say-so the key goes there and nowhere else.
PROVIDER_HOSTS = {
    "OPENAI_API_KEY": "api.openai.com",
    "OPENROUTER_API_KEY": "openrouter.ai",
    "GROQ_API_KEY": "api.groq.com",
    "MISTRAL_API_KEY": "api.mistral.ai",
    "TOGETHER_API_KEY": "api.together.xyz",
    "FIREWORKS_API_KEY": "api.fireworks.ai",
    "XAI_API_KEY": "api.x.ai",
    "GEMINI_API_KEY": "generativelanguage.googleapis.com",
}
# Set by the server's owner where ComfyUI starts, never by a workflow: "host" or "host:port", comma-separated.
HOSTS_VARIABLE = "FLUXQ_CAPTION_HOSTS"


@user_facing
class CaptionError(RuntimeError):
    """This image could not be captioned (the per-image failure policy decides what follows)."""

    fatal = False


@user_facing
class EndpointError(CaptionError):
    """The endpoint cannot caption anything (unreachable, refused, wrong URL or model): stop."""

    fatal = True


@dataclass(frozen=True)
class EndpointSettings:
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    instruction: str = DEFAULT_INSTRUCTION
    temperature: float = 0.2
    max_tokens: int = 120
    timeout_s: float = 60.0

    def cache_key(self) -> str:
        """What changes a reply (the timeout does not)."""
        fields = asdict(self)
        del fields["timeout_s"]
        return json.dumps(fields, sort_keys=True)


def api_key_from_env(variable: str) -> str | None:
    variable = variable.strip()
    if not variable:
        return None
    if not KEY_VARIABLE.match(variable):
        raise EndpointError(f"api_key_env {variable!r}: the key is only read from a variable whose name ends "
                            "in API_KEY (e.g. OPENAI_API_KEY), or leave it empty to send no key")
    return os.environ.get(variable) or None


def _shown_url(url: str) -> str:
    """The URL for messages: without user:password and query (either may carry a secret)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _approved_hosts(environ) -> list[tuple[str, int | None]]:
    """(host, port or None) of each FLUXQ_CAPTION_HOSTS entry."""
    entries = []
    for entry in re.split(r"[,\s]+", environ.get(HOSTS_VARIABLE, "")):
        if not entry:
            continue
        try:
            parts = urllib.parse.urlsplit("//" + entry)
            host, port = parts.hostname, parts.port
        except ValueError:
            host = None
        if not host or parts.path or parts.username or parts.query:
            raise EndpointError(f"{HOSTS_VARIABLE} entry {entry!r} is not a host name or host:port")
        entries.append((host.rstrip("."), port))
    return entries


def check_endpoint_host(url: str, key_variable: str, sends_key: bool, environ=os.environ) -> None:
    """Refuses (EndpointError naming the host) an endpoint the server's owner did not approve.

    Images go to loopback hosts, to the known providers' hosts and to FLUXQ_CAPTION_HOSTS; a key
    goes only to its own provider's host and to FLUXQ_CAPTION_HOSTS, loopback included (any local
    user can listen on a loopback port). Only names are compared, nothing is resolved or opened,
    so a host that does not exist is refused by this rule, not by a DNS error.
    """
    parts = urllib.parse.urlsplit(url.strip())
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = host if parts.port is None else f"{host}:{parts.port}"
    listed = any(h == host and p in (None, port) for h, p in _approved_hosts(environ))
    variable = key_variable.strip().upper()
    own_host = PROVIDER_HOSTS.get(variable)
    how = (f"add {shown} to the environment variable {HOSTS_VARIABLE} (comma-separated host or host:port) "
           "where ComfyUI starts; a workflow cannot approve a host")
    if sends_key:
        if listed or host == own_host:
            return
        approved = (f"{own_host} and " if own_host else "") + f"the hosts in {HOSTS_VARIABLE}"
        local = (": clear api_key_env for a local server that needs no key, or "
                 if _is_loopback(host) else ". To send it there, ")
        raise EndpointError(f"the key from {key_variable.strip()} is only sent to {approved}, not to the endpoint "
                            f"host {shown}{local}{how}")
    if _is_loopback(host) or listed or host in PROVIDER_HOSTS.values():
        return
    raise EndpointError(f"endpoint host {shown} is not approved: images are only sent to this computer "
                        f"(localhost), the known API providers and the hosts in {HOSTS_VARIABLE}. To use it, {how}")


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would resend the Authorization header to wherever a redirect points.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Request:
    """The sockets of one request in flight, so that cancel or the request's deadline can cut it
    off from another thread: a blocking read would otherwise wait for as long as the server takes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cut_reason: str | None = None

    def opened(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.cut_reason is None:
                return
        _shut(sock)  # cut before the connection was made

    def cut(self, reason: str) -> None:
        with self._lock:
            self.cut_reason = self.cut_reason or reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it (close() would not)
    except OSError:
        pass


class _CuttableConnection:
    def __init__(self, *args, request: _Request, **kwargs):
        super().__init__(*args, **kwargs)
        self._request = request

    def connect(self):
        super().connect()
        self._request.opened(self.sock)


class _HTTPConnection(_CuttableConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_CuttableConnection, http.client.HTTPSConnection):
    pass


_CUTTABLE = {http.client.HTTPConnection: _HTTPConnection, http.client.HTTPSConnection: _HTTPSConnection}


class _CuttableHandler:
    """urllib's handler (proxies, TLS checks and all) with connections that report their socket."""

    def __init__(self, request: _Request):
        super().__init__()
        self._request = request

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_CUTTABLE[http_class], req, request=self._request, **kwargs)


class _HTTPHandler(_CuttableHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_CuttableHandler, urllib.request.HTTPSHandler):
    pass


def image_data_url(image: Image.Image) -> str:
    """The image as a JPEG data URL, the long side at most IMAGE_LONG_SIDE."""
    image = image.convert("RGB")
    if max(image.size) > IMAGE_LONG_SIDE:
        scale = IMAGE_LONG_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VisionCaptioner:
    """Captions one image per call; safe to call from several threads. `abort()` ends every call
    in progress at once (InterruptedError), whether it is waiting to retry or reading a reply."""

    def __init__(self, settings: EndpointSettings, key_variable: str = DEFAULT_KEY_VARIABLE, *,
                 max_retries: int = MAX_RETRIES, backoff_s: float = 1.0, stop: threading.Event | None = None):
        self.settings = settings
        self.key_variable = key_variable.strip()
        self._key = api_key_from_env(key_variable)
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.stop = stop or threading.Event()
        self._in_flight: set[_Request] = set()
        self._lock = threading.Lock()
        parts = urllib.parse.urlsplit(settings.base_url.strip())
        try:
            parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
            usable = parts.scheme in ("http", "https") and parts.hostname
        except ValueError:
            usable = False
        if not usable:
            raise EndpointError(f"endpoint_url {_shown_url(settings.base_url)!r} must be an http:// or https:// URL")
        check_endpoint_host(settings.base_url, self.key_variable, self._key is not None)
        if self._key and parts.scheme == "http" and not _is_local(parts.hostname):
            raise EndpointError(
                f"refusing to send the key from {self.key_variable} unencrypted to {parts.hostname}: use https, "
                "or clear api_key_env for a server that needs no key")
        if not settings.model.strip():
            raise EndpointError("model is empty: name the vision model the endpoint serves")
        self.url = settings.base_url.strip().rstrip("/") + "/chat/completions"
        self.shown = f"endpoint {_shown_url(self.url)} (model {settings.model!r})"

    def abort(self) -> None:
        """Stops every caption call: waits end and requests in flight are cut off."""
        self.stop.set()
        with self._lock:
            requests = list(self._in_flight)
        for request in requests:
            request.cut("cancel")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[key]") if self._key else text

    def _post(self, body: bytes, headers: dict[str, str], request: _Request) -> bytes:
        """One attempt: the reply's body, within `timeout` for all of it (the request is cut off at
        the deadline; urllib's own timeout only bounds each read)."""
        opener = urllib.request.build_opener(_NoRedirect, _HTTPHandler(request), _HTTPSHandler(request))
        deadline = threading.Timer(self.settings.timeout_s, request.cut, ("deadline",))
        deadline.daemon = True
        with self._lock:
            self._in_flight.add(request)
        if self.stop.is_set():  # abort() ran before this request was registered
            request.cut("cancel")
        deadline.start()
        try:
            outgoing = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            with opener.open(outgoing, timeout=self.settings.timeout_s) as response:
                raw = response.read()
            if request.cut_reason:  # a reply without a length just ends where it was cut
                raise ConnectionAbortedError(request.cut_reason)
            return raw
        finally:
            deadline.cancel()
            with self._lock:
                self._in_flight.discard(request)

    def caption(self, image: Image.Image) -> str:
        s = self.settings
        body = json.dumps({
            "model": s.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": s.instruction},
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
            ]}],
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        timed_out = f"no answer within {s.timeout_s:g} s"
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise InterruptedError("captioning stopped")
            request = _Request()
            backoff = self.backoff_s * 2 ** attempt
            try:
                return self._parse(self._post(body, headers, request))
            except urllib.error.HTTPError as e:
                status, reply = e.code, self._redact(_error_text(e))
                retry_after = _retry_after(e.headers.get("Retry-After"))
                e.close()
                if status in (401, 403):
                    sent = (f"the key from {self.key_variable} was refused" if self._key else
                            f"no key was sent ({self.key_variable or 'api_key_env'} is not set)")
                    raise EndpointError(f"{self.shown} answered HTTP {status}: {sent}") from None
                if status == 404:
                    raise EndpointError(f"{self.shown} answered HTTP 404: check the base URL (it usually ends in "
                                        f"/v1) and that the server has this model. {reply}") from None
                if 300 <= status < 400:
                    raise EndpointError(f"{self.shown} redirects (HTTP {status}); give the final URL") from None
                if status != 429 and status < 500:
                    raise CaptionError(f"{self.shown} refused this image: HTTP {status} {reply}") from None
                last = f"HTTP {status} {reply}".strip()
                if retry_after is not None and retry_after > s.timeout_s:
                    # waiting would break the time the node's timeout promises; fewer pauses would
                    # only be refused again
                    raise CaptionError(f"{self.shown} answered {last} and asks to wait {retry_after:.0f} s "
                                       f"(Retry-After), longer than timeout ({s.timeout_s:g} s): try later, or "
                                       "raise timeout") from None
                delay = retry_after if retry_after is not None else backoff
            except CaptionError:
                raise
            except Exception as e:
                if request.cut_reason == "cancel":
                    raise InterruptedError("captioning stopped") from None
                if request.cut_reason == "deadline" or isinstance(e, (TimeoutError, socket.timeout)) or (
                        isinstance(e, urllib.error.URLError) and isinstance(e.reason, (TimeoutError, socket.timeout))):
                    last, delay = timed_out, backoff
                elif isinstance(e, urllib.error.URLError):
                    raise EndpointError(f"cannot reach {self.shown}: {self._redact(str(e.reason))}") from None
                elif isinstance(e, (ConnectionError, http.client.HTTPException)):
                    last, delay = f"connection dropped ({type(e).__name__})", backoff
                else:
                    raise
            if attempt < self.max_retries:
                delay = min(delay, s.timeout_s)
                log.info("%s: %s; retrying in %.1f s", self.shown, last, delay)
                if self.stop.wait(delay):
                    raise InterruptedError("captioning stopped")
        raise CaptionError(f"{self.shown} failed {self.max_retries + 1} times: {last}")

    def _parse(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
            if isinstance(content, list):  # some servers answer in parts
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            if not isinstance(content, str):
                raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            excerpt = self._redact(raw[:200].decode("utf-8", "replace"))
            raise CaptionError(f"{self.shown} sent a malformed reply ({e}): {excerpt!r}") from None
        text = clean_caption(content)
        if not text:
            raise CaptionError(f"{self.shown} sent an empty caption")
        return text


def clean_caption(text: str) -> str:
    """One line of prose: reasoning blocks of thinking models, quotes and line breaks removed."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    text = " ".join(text.split())
    return text.strip("\"'“”‘’ ")


def _error_text(error: urllib.error.HTTPError) -> str:
    """The server's own message (OpenAI: {"error": {"message": ...}}), short."""
    try:
        raw = error.read(4096)
    except OSError:
        return ""
    try:
        message = json.loads(raw)["error"]
        message = message.get("message", message) if isinstance(message, dict) else message
        return str(message)[:300]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:300]


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
