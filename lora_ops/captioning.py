"""Captions from an OpenAI-compatible vision chat endpoint (`POST {base_url}/chat/completions`).

OpenAI, and local servers that speak the same protocol (Ollama, LM Studio, vLLM, llama.cpp's
server), take the image as a base64 data URL in a user message. HTTP is the standard library's
urllib: one JSON POST per image needs nothing more.

The API key comes only from an environment variable whose name ends in API_KEY (so a shared
workflow cannot name another secret); it is sent as a bearer header and kept out of every message,
log line and file. Without the variable (or with an empty name) no key is sent, which is what
local servers expect.
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
MAX_RETRIES = 5  # after the first attempt, for 429, 5xx and timeouts
MAX_WAIT_S = 60.0  # longest pause between attempts, whatever Retry-After says
IMAGE_LONG_SIDE = 1024  # vision models see at most about this much; smaller uploads are faster
KEY_VARIABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*_)?API_KEY$", re.IGNORECASE)


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
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


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
    """Captions one image per call; safe to call from several threads."""

    def __init__(self, settings: EndpointSettings, key_variable: str = DEFAULT_KEY_VARIABLE, *,
                 max_retries: int = MAX_RETRIES, backoff_s: float = 1.0, stop: threading.Event | None = None):
        self.settings = settings
        self.key_variable = key_variable.strip()
        self._key = api_key_from_env(key_variable)
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.stop = stop or threading.Event()
        parts = urllib.parse.urlsplit(settings.base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(f"endpoint_url {_shown_url(settings.base_url)!r} must be an http:// or https:// URL")
        if self._key and parts.scheme == "http" and not _is_local(parts.hostname):
            raise EndpointError(
                f"refusing to send the key from {self.key_variable} unencrypted to {parts.hostname}: use https, "
                "or clear api_key_env for a server that needs no key")
        if not settings.model.strip():
            raise EndpointError("model is empty: name the vision model the endpoint serves")
        self.url = settings.base_url.strip().rstrip("/") + "/chat/completions"
        self.shown = f"endpoint {_shown_url(self.url)} (model {settings.model!r})"
        self._opener = urllib.request.build_opener(_NoRedirect)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[key]") if self._key else text

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
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise InterruptedError("captioning stopped")
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=s.timeout_s) as response:
                    return self._parse(response.read())
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
                delay = retry_after if retry_after is not None else self.backoff_s * 2 ** attempt
            except (TimeoutError, socket.timeout):
                last, delay = f"no answer within {s.timeout_s:g} s", self.backoff_s * 2 ** attempt
            except urllib.error.URLError as e:
                if isinstance(e.reason, (TimeoutError, socket.timeout)):
                    last, delay = f"no answer within {s.timeout_s:g} s", self.backoff_s * 2 ** attempt
                else:
                    raise EndpointError(f"cannot reach {self.shown}: {self._redact(str(e.reason))}") from None
            except (ConnectionError, http.client.HTTPException) as e:
                last, delay = f"connection dropped ({type(e).__name__})", self.backoff_s * 2 ** attempt
            if attempt < self.max_retries:
                log.info("%s: %s; retrying in %.1f s", self.shown, last, min(delay, MAX_WAIT_S))
                if self.stop.wait(min(delay, MAX_WAIT_S)):
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
