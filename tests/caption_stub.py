"""A stand-in for an OpenAI-compatible vision endpoint on a loopback port: real HTTP, real JSON.

It decodes the image of each request and answers with its dominant colour ("a plain red
square"), so a test can check that the right image reached it. `script` queues behaviours for
the next requests: ("status", code, headers, body), ("sleep", seconds), ("malformed", body),
("trickle", seconds): the reply's headers at once, then its body a byte every 0.1 s for `seconds`
(a server that is slow but never silent for long).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageStat

# The environment the shared test server (tests/conftest.py) starts in, as its owner would set it:
# a key, and the one host approved for it, the stub's (FLUXQ_CAPTION_HOSTS).
SERVER_API_KEY_VARIABLE = "FLUXQ_SERVER_TEST_API_KEY"
SERVER_API_KEY = "sk-server-test-5e1d0c9b8a"
SERVER_ENV = {SERVER_API_KEY_VARIABLE: SERVER_API_KEY, "FLUXQ_CAPTION_HOSTS": "127.0.0.1"}

COLOUR_NAMES = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0)}


def colour_name(image: Image.Image) -> str:
    r, g, b = (c / 255 for c in ImageStat.Stat(image.convert("RGB")).mean)
    return min(COLOUR_NAMES, key=lambda n: sum((x - y) ** 2 for x, y in zip(COLOUR_NAMES[n], (r, g, b))))


class CaptionStub:
    def __init__(self, model: str = "stub-vision"):
        self.model = model
        self.script: list[tuple] = []
        self.requests: list[dict] = []  # {"authorization", "size", "colour", "body"}
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub._lock:
                    action = stub.script.pop(0) if stub.script else ("ok",)
                record = {"authorization": self.headers.get("Authorization"), "path": self.path, "time": time.time()}
                try:
                    request = json.loads(body)
                    content = request["messages"][0]["content"]
                    url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
                    assert url.startswith("data:image/jpeg;base64,")
                    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                    image.load()
                    record.update(size=image.size, colour=colour_name(image), body=request)
                except Exception as e:  # a broken request is a test failure: answer 400 and record it
                    record["error"] = repr(e)
                    stub.requests.append(record)
                    return self._send(400, {"error": {"message": f"bad request: {e}"}})
                stub.requests.append(record)
                if self.path != "/v1/chat/completions" or request.get("model") != stub.model:
                    return self._send(404, {"error": {"message": f"model {request.get('model')!r} not found"}})
                kind = action[0]
                if kind == "status":
                    return self._send(action[1], action[3] if len(action) > 3 else {"error": {"message": "busy"}},
                                      action[2] if len(action) > 2 else {})
                if kind == "sleep":
                    time.sleep(action[1])
                if kind == "malformed":
                    return self._send(200, action[1])
                if kind == "trickle":
                    return self._trickle(action[1])
                text = f"a plain {record['colour']} square"
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

            def _trickle(self, seconds):
                data = json.dumps({"choices": [{"message": {"content": "a slow reply"}}]}).encode()
                pad = b" " * int(seconds / 0.1)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(pad) + len(data)))
                    self.end_headers()
                    for byte in pad:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.1)
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client cut it off

            def _send(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
