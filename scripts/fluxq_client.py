#!/usr/bin/env python3
"""Run a ComfyUI workflow headless: queue it, follow its progress, download what it made.

Usage:
    python scripts/fluxq_client.py WORKFLOW.json [--server http://127.0.0.1:8188]
        [--map scripts/tiny_model_map.json] [--set NODE.input=value ...]
        [--out DIR] [--timeout SECONDS] [--print-prompt]
    python scripts/fluxq_client.py WORKFLOW.json --server URL [--server URL ...]
        [--sweep NODE.input=[v1,v2,...] ...] [--batch OVERRIDES.jsonl] [--per-server K] ...

WORKFLOW.json is an API-format prompt (the frontend's "Export (API)", or `workflows/api/*.json`)
or a UI workflow as the frontend saves it; a UI workflow is converted with the server's
`/object_info`, by the same rules the frontend uses when it queues.

--set NODE.input=value   Override one input. NODE is a node id or a node's title
                         (`_meta.title`). The value takes the input's type as the server's
                         /object_info declares it: a number for INT/FLOAT, true/false for
                         BOOLEAN, the text as written for STRING and dropdowns (so `null`,
                         `true` or `NaN` stay text there), a JSON list for a link. Repeatable.
                         Example: --set "Prompt.text=a red fox" --set Sampler.seed=7
--map FILE               A JSON object {old value: new value}: every input value equal to a key
                         is replaced (e.g. real model file names -> small test models). Applied
                         before --set.
--out DIR                Where the output images/latents are saved (default: ./out). Each saved
                         path is printed on stdout; progress goes to stderr.
--print-prompt           Print the final API prompt (after conversion, --map and --set) and exit
                         without queueing it.
--allow-partial          ComfyUI queues a prompt in which some outputs fail validation and runs only
                         the others (HTTP 200 with node_errors). The client reports each such node
                         and, by default, takes the prompt off the server and fails (exit 1); with
                         --allow-partial it warns and runs the rest.
--reconnect-timeout S    Single run: when the connection to the server drops (it died, restarted,
                         a proxy), the client reconnects for up to S seconds (default 60), then
                         fails (exit 1) instead of waiting for --timeout. A server that hangs
                         without closing the connection is noticed first by the websocket
                         heartbeat, within 45 s: a server that dies, hangs or drops off the
                         network fails the run within S + 45 s.

A batch of prompts (--sweep, --batch, or several --server) runs the workflow once per job over
all the servers, at most K (--per-server) in flight on each:
--sweep NODE.input=[...] One job per value of the JSON list; several sweeps multiply.
--batch FILE.jsonl       One job per line, a JSON object {"NODE.input": value, ...} of overrides
                         (applied after --set); combined with --sweep, every line x every value.
--server URL             Repeatable. A server that stops answering, or whose prompt takes longer
                         than --timeout, is dropped and its prompts are queued on the others; the
                         node definitions come from the first server that answers.
--overwrite              Replace job folders an earlier batch left in DIR. Without it, a batch whose
                         DIR already holds any of its job-NNNN folders is refused (exit 2) before
                         anything is queued; with it, each old folder is replaced only once the new
                         job's outputs are downloaded (a job that fails leaves the old folder).
Each job's outputs land in DIR/job-NNNN/ (NNNN = the job's number in the batch), written once:
a job that was re-queued after its server died is downloaded from the server that finished it.
Exit status 1 if any job failed (its error is printed), 0 when all completed.

Exit status: 0 on success; 1 when the server rejects the prompt or drops some of its outputs
(validation errors are printed per node) or execution fails or is interrupted or the server is
gone longer than --reconnect-timeout; 2 on a bad command line or unreadable file;
3 on --timeout and 130 on Ctrl-C (the prompt is then removed from the queue or interrupted).

Uses the standard library and aiohttp (a ComfyUI dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import aiohttp

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
HISTORY_POLL_SECONDS = 0.5
RECONNECT_SECONDS = 1.0
# A server that stops answering without closing the socket (hung, unplugged) is noticed by a ping
# after this long without a message and no pong within half of it (45 s): a dropped connection then.
WS_HEARTBEAT_SECONDS = 30.0


def _load_workflow_convert():
    # Loaded by path so the client needs neither the pack on sys.path nor lora_ops' torch imports:
    # lora_ops as a package of its own name (its __init__ imports nothing), then only this module
    # and what it imports relatively (errors.py).
    package_dir = Path(__file__).resolve().parent.parent / "lora_ops"
    package = "fluxq_client_lora_ops"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            package, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.workflow_convert")


workflow_convert = _load_workflow_convert()


class ClientError(Exception):
    """A failure to report to the user, with the exit status to leave with."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


# --- building the prompt -------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, str, str]:
    """`NODE.input=value` -> (node, input, value text); NODE may itself contain dots (a title)."""
    target, sep, raw_value = text.partition("=")
    node, dot, input_name = target.rpartition(".")
    if not sep or not dot or not node or not input_name:
        raise ClientError(f"--set {text!r}: expected NODE.input=value", EXIT_USAGE)
    return node, input_name, raw_value


def input_spec(object_info: dict, class_type: str, input_name: str) -> list | None:
    """The server's declaration `[type, options]` of one input, or None when it declares none."""
    sections = (object_info.get(class_type) or {}).get("input") or {}
    for section in ("required", "optional"):
        spec = (sections.get(section) or {}).get(input_name)
        if spec:
            return spec
    return None


def typed_value(text: str, spec: list | None, where: str):
    """The --set text as the value its input's declared type takes: numbers for INT/FLOAT, true/false
    for BOOLEAN, the text itself for STRING and combos (so `null`, `true` or `NaN` stay text there),
    a JSON list for a link. Undeclared inputs keep the text."""
    input_type = spec[0] if spec else None
    options = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if input_type == "INT":
        if not re.fullmatch(r"[+-]?\d+", text.strip()):
            raise ClientError(f"--set {where}={text}: this INT input takes a whole number", EXIT_USAGE)
        return int(text)
    if input_type == "FLOAT":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ClientError(f"--set {where}={text}: this FLOAT input takes a finite number", EXIT_USAGE)
        return value
    if input_type == "BOOLEAN":
        if text.strip().lower() not in ("true", "false"):
            raise ClientError(f"--set {where}={text}: this BOOLEAN input takes true or false", EXIT_USAGE)
        return text.strip().lower() == "true"
    if isinstance(input_type, list) or input_type == "COMBO":
        choices = input_type if isinstance(input_type, list) else options.get("options", [])
        # a combo of numbers is matched by its text; anything else stays text for the server to check
        return next((choice for choice in choices if not isinstance(choice, str) and str(choice) == text), text)
    if input_type is not None and input_type != "STRING" and text.lstrip().startswith("["):
        try:
            return json.loads(text)  # a link: ["node id", output index]
        except json.JSONDecodeError:
            pass
    return text


def find_node(prompt: dict, node_ref: str) -> str:
    if node_ref in prompt:
        return node_ref
    matches = [node_id for node_id, node in prompt.items() if node.get("_meta", {}).get("title") == node_ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ClientError(f"--set: title {node_ref!r} is used by nodes {', '.join(matches)}; use a node id",
                          EXIT_USAGE)
    known = ", ".join(f"{node_id} ({node.get('_meta', {}).get('title', node['class_type'])})"
                      for node_id, node in prompt.items())
    raise ClientError(f"--set: no node with id or title {node_ref!r}; nodes: {known}", EXIT_USAGE)


def apply_value_map(prompt: dict, value_map: dict) -> None:
    for node in prompt.values():
        inputs = node.get("inputs", {})
        for name, value in inputs.items():
            if isinstance(value, str) and value in value_map:
                inputs[name] = value_map[value]


def overridden_node(prompt: dict, node_ref: str, input_name: str) -> dict:
    node = prompt[find_node(prompt, node_ref)]
    if input_name not in node["inputs"]:
        print(f"note: node {node_ref!r} had no input {input_name!r}; adding it", file=sys.stderr)
    return node


def apply_overrides(prompt: dict, overrides: list[str], object_info: dict) -> None:
    """--set values, typed by the input declarations in the server's `object_info`."""
    for text in overrides:
        node_ref, input_name, raw_value = parse_override(text)
        node = overridden_node(prompt, node_ref, input_name)
        spec = input_spec(object_info, node["class_type"], input_name)
        node["inputs"][input_name] = typed_value(raw_value, spec, f"{node_ref}.{input_name}")


def apply_json_overrides(prompt: dict, overrides: list[str]) -> None:
    """A batch job's `NODE.input=JSON` overrides: written as JSON, so already typed."""
    for text in overrides:
        node_ref, input_name, raw_value = parse_override(text)
        overridden_node(prompt, node_ref, input_name)["inputs"][input_name] = json.loads(raw_value)


def read_json(path: str, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ClientError(f"cannot read {what} {path}: {error}", EXIT_USAGE) from error


async def server_object_info(sessions: dict[str, aiohttp.ClientSession]) -> dict:
    """`/object_info` from the first server (in command-line order) that answers: a batch whose first
    server is down runs on the others (every server runs the same pack: any one's definitions do)."""
    failures = []
    for url, session in sessions.items():
        try:
            return await get_json(session, "/object_info")
        except (aiohttp.ClientError, asyncio.TimeoutError, ClientError) as error:
            failures.append(f"{url}: {error}")
            if len(failures) < len(sessions):
                print(f"note: {url} does not answer /object_info ({error}); asking the next server", file=sys.stderr)
    raise ClientError("no server answers /object_info: " + "; ".join(failures))


async def build_prompt(sessions: dict[str, aiohttp.ClientSession], args) -> dict:
    data = read_json(args.workflow, "workflow")
    # the node definitions convert UI workflows and type --set values
    needs_info = workflow_convert.is_ui_workflow(data) or args.set
    object_info = await server_object_info(sessions) if needs_info else {}
    if workflow_convert.is_ui_workflow(data):
        try:
            prompt = workflow_convert.ui_to_api(data, object_info)
        except workflow_convert.WorkflowConvertError as error:
            raise ClientError(f"cannot convert {args.workflow}: {error}") from error
    elif isinstance(data, dict) and all(isinstance(node, dict) and "class_type" in node for node in data.values()):
        prompt = data
    else:
        raise ClientError(f"{args.workflow} is neither an API prompt nor a UI workflow", EXIT_USAGE)
    if args.map:
        value_map = read_json(args.map, "map file")
        if not isinstance(value_map, dict):
            raise ClientError(f"map file {args.map} must hold a JSON object", EXIT_USAGE)
        apply_value_map(prompt, value_map)
    apply_overrides(prompt, args.set, object_info)
    return prompt


# --- talking to the server -----------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, path: str):
    async with session.get(path) as response:
        if response.status != 200:
            raise ClientError(f"GET {path}: HTTP {response.status}: {(await response.text())[:500]}")
        return await response.json()


def describe_node(prompt: dict, node_id) -> str:
    node = prompt.get(str(node_id), {})
    title = node.get("_meta", {}).get("title")
    class_type = node.get("class_type", "?")
    if title and title != class_type:
        return f'node {node_id} "{title}" ({class_type})'
    return f"node {node_id} ({class_type})"


def node_error_lines(node_errors: dict, prompt: dict) -> list[str]:
    """One line per validation error of each node, naming the outputs it takes down with it."""
    lines = []
    for node_id, node_error in node_errors.items():
        dropped = node_error.get("dependent_outputs") or []
        drops = f" (drops {', '.join(describe_node(prompt, o) for o in dropped)})" if dropped else ""
        for item in node_error.get("errors", []):
            detail = f": {item['details']}" if item.get("details") else ""
            lines.append(f"  {describe_node(prompt, node_id)}: {item.get('message', '')}{detail}{drops}")
    return lines


def format_validation_error(body: dict, prompt: dict) -> str:
    error = body.get("error", {})
    if isinstance(error, str):
        error = {"message": error}
    lines = [f"server rejected the prompt: {error.get('message', 'unknown error')}"]
    if error.get("details"):
        lines.append(f"  {error['details']}")
    return "\n".join(lines + node_error_lines(body.get("node_errors") or {}, prompt))


async def queue_prompt(session: aiohttp.ClientSession, prompt: dict, client_id: str, allow_partial: bool) -> str:
    """Queues `prompt`, returns its id. ComfyUI accepts (HTTP 200) a prompt in which only some
    outputs pass validation and silently runs just those: that is a failure unless `allow_partial`
    (then a warning), and the prompt is taken off the server again."""
    async with session.post("/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
        text = await response.text()
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            body = None
        if response.status == 400 and isinstance(body, dict):
            raise ClientError(format_validation_error(body, prompt))
        if response.status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise ClientError(f"POST /prompt: HTTP {response.status}: {text[:500]}")
    prompt_id, node_errors = body["prompt_id"], body.get("node_errors") or {}
    if node_errors:
        report = "\n".join(node_error_lines(node_errors, prompt))
        if allow_partial:
            print(f"warning: prompt {prompt_id} runs without the outputs that failed validation "
                  f"(--allow-partial):\n{report}", file=sys.stderr)
        else:
            await cancel_prompt(session, prompt_id)
            raise ClientError(f"the server dropped outputs that failed validation; prompt {prompt_id} cancelled, "
                              f"nothing downloaded (--allow-partial runs the rest):\n{report}")
    return prompt_id


class ProgressDisplay:
    """A one-line text progress bar on stderr (redrawn on a terminal, sparse lines otherwise)."""

    BAR_WIDTH = 24

    def __init__(self, prompt: dict, stream=sys.stderr):
        self.prompt = prompt
        self.stream = stream
        self.interactive = stream.isatty()
        self.finished_nodes: set[str] = set()
        self.current_node: str | None = None
        self.last_decile: int | None = None

    def _nodes_text(self) -> str:
        return f"[{len(self.finished_nodes)}/{len(self.prompt)} nodes]"

    def _emit(self, line: str) -> None:
        if self.interactive:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def cached(self, node_ids) -> None:
        self.finished_nodes.update(str(node_id) for node_id in node_ids)

    def node_started(self, node_id) -> None:
        if self.current_node is not None:
            self.finished_nodes.add(self.current_node)
        self.current_node, self.last_decile = str(node_id), None
        self._emit(f"{self._nodes_text()} {describe_node(self.prompt, node_id)}")

    def progress(self, node_id, value: int, maximum: int) -> None:
        fraction = value / maximum if maximum else 1.0
        decile = int(fraction * 10)
        if not self.interactive and decile == self.last_decile and value != maximum:
            return
        self.last_decile = decile
        filled = int(fraction * self.BAR_WIDTH)
        bar = "#" * filled + "-" * (self.BAR_WIDTH - filled)
        self._emit(f"{self._nodes_text()} {describe_node(self.prompt, node_id)} [{bar}] {value}/{maximum}")

    def done(self, message: str) -> None:
        if self.current_node is not None:
            self.finished_nodes.add(self.current_node)
        self._emit(f"{self._nodes_text()} {message}")
        if self.interactive:
            self.stream.write("\n")


async def follow_progress(ws: aiohttp.ClientWebSocketResponse, prompt_id: str, display: ProgressDisplay) -> bool:
    """Consume websocket messages until the server says our prompt is finished (True), or the
    socket closes first (False: a server restart, a proxy)."""
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            continue  # binary frames are latent previews
        event = json.loads(message.data)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "execution_cached":
            display.cached(data.get("nodes", []))
        elif kind == "executing":
            if data.get("node") is None:
                if data.get("prompt_id") == prompt_id:
                    return True
            else:
                display.node_started(data["node"])
        elif kind == "progress":
            display.progress(data.get("node"), data.get("value", 0), data.get("max", 0))
        elif kind in ("execution_error", "execution_interrupted"):
            display.done(f"{kind.replace('_', ' ')} at {describe_node(display.prompt, data.get('node_id'))}")
    return False


async def wait_for_history(session: aiohttp.ClientSession, prompt_id: str) -> dict:
    while True:
        history = await get_json(session, f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        await asyncio.sleep(HISTORY_POLL_SECONDS)


async def prompt_state(session: aiohttp.ClientSession, prompt_id: str) -> tuple[str, dict | None]:
    """("finished", its history entry), ("queued", None) while pending or running, or ("lost", None)."""
    history = await get_json(session, f"/history/{prompt_id}")
    if prompt_id in history:
        return "finished", history[prompt_id]
    queue = await get_json(session, "/queue")
    if any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key, [])):
        return "queued", None
    # It may have finished between the two questions (ComfyUI moves a prompt from the queue to the
    # history in one step): ask the history again before calling it lost.
    history = await get_json(session, f"/history/{prompt_id}")
    if prompt_id in history:
        return "finished", history[prompt_id]
    return "lost", None


async def reconnect(session: aiohttp.ClientSession, ws_path: str, prompt_id: str,
                    within: float) -> tuple[aiohttp.ClientWebSocketResponse | None, dict | None]:
    """A new websocket and the prompt's history entry if it has finished; retried while the server
    is away, for `within` seconds at most (each attempt bounded too: a hung server accepts
    connections and never answers)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        ws = None
        try:
            ws = await asyncio.wait_for(session.ws_connect(ws_path, heartbeat=WS_HEARTBEAT_SECONDS),
                                        max(deadline - loop.time(), 0.1))
            # asked once connected, so a prompt finishing now still reaches this socket
            state, entry = await asyncio.wait_for(prompt_state(session, prompt_id), max(deadline - loop.time(), 0.1))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
            if ws is not None:
                await ws.close()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ClientError(f"the server did not come back within {within:g} s (--reconnect-timeout; last "
                                  f"try: {str(error) or type(error).__name__}); prompt {prompt_id}'s result is unknown")
            await asyncio.sleep(min(RECONNECT_SECONDS, remaining))
            continue
        if state == "lost":
            await ws.close()
            raise ClientError(f"prompt {prompt_id} is lost: the server has it neither queued, running nor "
                              "in its history (it was restarted?); queue it again")
        if state == "finished":
            await ws.close()
            return None, entry
        return ws, None


async def wait_for_result(session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, ws_path: str,
                          prompt_id: str, display: ProgressDisplay, reconnect_timeout: float) -> dict:
    """The prompt's history entry, following its progress on `ws`. When the socket drops (a server
    restart, a proxy), reconnects and finds the prompt again: a prompt the server neither queues,
    runs nor lists in its history is lost (a restarted ComfyUI forgets its queue), and a server
    that stays away longer than `reconnect_timeout` fails the run; neither waits out --timeout."""
    while True:
        try:
            if await follow_progress(ws, prompt_id, display):
                return await wait_for_history(session, prompt_id)
        finally:
            await ws.close()
        print(f"note: the connection to the server dropped; reconnecting for up to {reconnect_timeout:g} s",
              file=sys.stderr)
        ws, entry = await reconnect(session, ws_path, prompt_id, reconnect_timeout)
        if entry is not None:
            return entry


def execution_failure(entry: dict, prompt: dict) -> str | None:
    """The error text for a failed run from its history entry, or None when it succeeded."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (
                f"execution failed at {describe_node(prompt, data.get('node_id'))}: "
                f"{data.get('exception_type', 'Exception')}: {data.get('exception_message', '').strip()}"
            )
        if kind == "execution_interrupted":
            return f"execution was interrupted at {describe_node(prompt, data.get('node_id'))}"
    return "execution failed (the server gave no error message)"


async def cancel_prompt(session: aiohttp.ClientSession, prompt_id: str) -> None:
    """Take our prompt out of the queue, or stop it if it is running (never anyone else's)."""
    async with session.post("/queue", json={"delete": [prompt_id]}):
        pass
    async with session.post("/interrupt", json={"prompt_id": prompt_id}):
        pass


# --- saving outputs ------------------------------------------------------------------------------


def output_files(entry: dict) -> list[dict]:
    """Every file a node reported (images, latents, ...) as {filename, subfolder, type}, once each."""
    files, seen = [], set()
    for node_output in (entry.get("outputs") or {}).values():
        for items in node_output.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
                    continue
                key = (item.get("type", "output"), item.get("subfolder", ""), item["filename"])
                if key not in seen:
                    seen.add(key)
                    files.append({"type": key[0], "subfolder": key[1], "filename": key[2]})
    return files


def safe_local_path(out_dir: Path, subfolder: str, filename: str) -> Path:
    """A file name inside out_dir built from the server's subfolder + name, never escaping out_dir."""
    parts = [part for part in re.split(r"[\\/]+", f"{subfolder}/{filename}") if part not in ("", ".", "..")]
    name = "_".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in parts).lstrip(".") or "output"
    candidate, counter = out_dir / name, 1
    while candidate.exists():
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate, counter = out_dir / f"{stem}-{counter}{suffix}", counter + 1
    if candidate.resolve().parent != out_dir.resolve():
        raise ClientError(f"refusing to write {filename!r} outside {out_dir}")
    return candidate


async def download_outputs(session: aiohttp.ClientSession, entry: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for item in output_files(entry):
        target = safe_local_path(out_dir, item["subfolder"], item["filename"])
        async with session.get("/view", params=item) as response:
            if response.status == 404 and item["type"] == "temp":
                # Previews live in ComfyUI's temp folder, which any ComfyUI start on that folder empties.
                print(f"note: preview {item['filename']} is gone from the server's temp folder", file=sys.stderr)
                continue
            if response.status != 200:
                raise ClientError(f"GET /view {item}: HTTP {response.status}")
            # written beside the target, then renamed: a broken download leaves no half file
            partial = target.with_name(target.name + ".part")
            try:
                with open(partial, "wb") as handle:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        handle.write(chunk)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        saved.append(target)
    return saved


# --- the run -------------------------------------------------------------------------------------


async def run(args) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(base_url=args.server.rstrip("/") + "/", timeout=timeout) as session:
        prompt = await build_prompt({args.server: session}, args)
        if args.print_prompt:
            print(json.dumps(prompt, indent=2))
            return EXIT_OK

        client_id = uuid.uuid4().hex
        display = ProgressDisplay(prompt)
        # Connect before queueing so no message of a fast prompt is missed.
        ws_path = f"/ws?clientId={client_id}"
        async with session.ws_connect(ws_path, heartbeat=WS_HEARTBEAT_SECONDS) as ws:
            prompt_id = await queue_prompt(session, prompt, client_id, args.allow_partial)
            print(f"queued prompt {prompt_id}", file=sys.stderr)
            try:
                entry = await asyncio.wait_for(
                    wait_for_result(session, ws, ws_path, prompt_id, display, args.reconnect_timeout), args.timeout)
            except asyncio.TimeoutError:
                await cancel_prompt(session, prompt_id)
                raise ClientError(f"timed out after {args.timeout:g} s; prompt {prompt_id} cancelled", EXIT_TIMEOUT)
            except asyncio.CancelledError:  # Ctrl-C: do not leave a long run going on the server
                await cancel_prompt(session, prompt_id)
                print(f"\nprompt {prompt_id} cancelled on the server", file=sys.stderr)
                raise

        failure = execution_failure(entry, prompt)
        if failure:
            raise ClientError(failure)
        display.done("finished")
        for path in await download_outputs(session, entry, Path(args.out)):
            print(path)
    return EXIT_OK


# --- a batch over several servers -----------------------------------------------------------------


class ServerGone(Exception):
    """The server stopped answering or took longer than --timeout: its prompts go elsewhere."""


def batch_jobs(args) -> list[list[str]]:
    """Each job's extra `NODE.input=value` overrides: the --batch lines times the --sweep values."""
    lines: list[list[str]] = [[]]
    if args.batch:
        try:
            text = Path(args.batch).read_text(encoding="utf-8")
        except OSError as error:
            raise ClientError(f"cannot read batch file {args.batch}: {error}", EXIT_USAGE) from error
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                overrides = json.loads(line)
            except json.JSONDecodeError as error:
                raise ClientError(f"{args.batch} line {number}: not JSON: {error}", EXIT_USAGE) from error
            if not isinstance(overrides, dict):
                raise ClientError(f"{args.batch} line {number}: expected an object of NODE.input: value", EXIT_USAGE)
            lines.append([f"{key}={json.dumps(value)}" for key, value in overrides.items()])
        if not lines:
            raise ClientError(f"batch file {args.batch} holds no jobs", EXIT_USAGE)
    sweeps = []
    for text in args.sweep:
        target, sep, values = text.partition("=")
        try:
            values = json.loads(values) if sep else None
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or not values:
            raise ClientError(f"--sweep {text!r}: expected NODE.input=[value, ...] (a JSON list)", EXIT_USAGE)
        sweeps.append([f"{target}={json.dumps(value)}" for value in values])
    return [line + list(combo) for line in lines for combo in itertools.product(*sweeps)]


async def run_on_server(session: aiohttp.ClientSession, prompt: dict, timeout: float, allow_partial: bool) -> dict:
    """Queues `prompt`, waits for its history entry by polling (the state survives a dropped
    socket); raises ServerGone when the server does not answer or the prompt outlasts `timeout`."""
    try:
        prompt_id = await queue_prompt(session, prompt, uuid.uuid4().hex, allow_partial)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        raise ServerGone(f"cannot queue: {error}") from error
    try:
        return await asyncio.wait_for(wait_for_history(session, prompt_id), timeout)
    except (aiohttp.ClientError, ClientError) as error:  # before TimeoutError: aiohttp's timeouts are both
        raise ServerGone(f"stopped answering: {error}") from error
    except asyncio.TimeoutError:
        try:  # a slow server: do not leave it rendering what another server will render
            await asyncio.wait_for(cancel_prompt(session, prompt_id), 10)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        raise ServerGone(f"prompt {prompt_id} took longer than {timeout:g} s") from None


def job_dir(out_dir: Path, index: int) -> Path:
    return out_dir / f"job-{index:04d}"


def unused_dir(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`, ... : the first name not taken."""
    candidate, counter = path, 1
    while candidate.exists():
        candidate, counter = path.with_name(f"{path.name}-{counter}"), counter + 1
    return candidate


async def run_batch(args, servers: list[str]) -> int:
    # A dead server refuses the connection at once; a busy one may answer slowly (its executor
    # holds the GIL): only --timeout per prompt decides that a live server is too slow.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    sessions = {url: aiohttp.ClientSession(base_url=url.rstrip("/") + "/", timeout=timeout) for url in servers}
    try:
        base = await build_prompt(sessions, args)
        jobs = batch_jobs(args)
        prompts = []
        for overrides in jobs:
            prompt = json.loads(json.dumps(base))
            apply_json_overrides(prompt, overrides)
            prompts.append(prompt)
        out_dir = Path(args.out)
        # Results of an earlier batch in the same folder are the user's: refused before anything
        # is queued, replaced (each once its new result is complete) only with --overwrite.
        taken = [job_dir(out_dir, index).name for index in range(len(prompts)) if job_dir(out_dir, index).exists()]
        if taken and not args.overwrite:
            shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
            raise ClientError(f"{out_dir} already holds results of an earlier batch ({shown}); choose another --out, "
                              "or pass --overwrite to replace each job's folder once its new result is downloaded",
                              EXIT_USAGE)
        out_dir.mkdir(parents=True, exist_ok=True)
        pending: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(prompts)):
            pending.put_nowait(index)
        finished: dict[int, str] = {}  # job -> the server that completed it
        failed: dict[int, str] = {}  # job -> its error
        alive = set(servers)
        print(f"{len(prompts)} job(s) over {len(servers)} server(s), at most {args.per_server} in flight each",
              file=sys.stderr)

        def all_done() -> bool:
            return len(finished) + len(failed) == len(prompts)

        async def worker(url: str) -> None:
            session = sessions[url]
            while url in alive and not all_done():
                try:
                    index = pending.get_nowait()
                except asyncio.QueueEmpty:
                    await asyncio.sleep(0.2)  # jobs may come back from a server that died
                    continue
                staging = out_dir / f".job-{index:04d}.{uuid.uuid4().hex[:8]}.part"
                try:
                    entry = await run_on_server(session, prompts[index], args.timeout, args.allow_partial)
                    failure = execution_failure(entry, prompts[index])
                    if failure:
                        failed[index] = failure
                        print(f"job {index} failed on {url}: {failure}", file=sys.stderr)
                        continue
                    try:
                        await download_outputs(session, entry, staging)
                    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                        shutil.rmtree(staging, ignore_errors=True)
                        raise ServerGone(f"download failed: {error}") from error
                except ServerGone as error:
                    alive.discard(url)
                    pending.put_nowait(index)
                    print(f"server {url} dropped ({error}); job {index} re-queued", file=sys.stderr)
                    return
                except ClientError as error:  # the server refused this prompt: it would refuse it anywhere
                    shutil.rmtree(staging, ignore_errors=True)
                    failed[index] = str(error)
                    print(f"job {index} failed on {url}: {error}", file=sys.stderr)
                    continue
                final = job_dir(out_dir, index)
                if final.exists():
                    if not args.overwrite:  # appeared since the check at the start (another client?)
                        final = unused_dir(final)
                        print(f"note: job-{index:04d} was created meanwhile; job {index} saved in {final.name}",
                              file=sys.stderr)
                    else:
                        shutil.rmtree(final)  # --overwrite: an earlier batch's result for the same job number
                os.replace(staging, final)
                finished[index] = url
                print(f"job {index} done on {url}", file=sys.stderr)
                for path in sorted(final.iterdir()):
                    print(path)

        workers = [worker(url) for url in servers for _ in range(args.per_server)]
        await asyncio.gather(*workers)
        while not pending.empty():
            index = pending.get_nowait()
            failed[index] = "every server dropped out before it ran"
    finally:
        for session in sessions.values():
            await session.close()
    for index in sorted(failed):
        print(f"error: job {index}: {failed[index]}", file=sys.stderr)
    print(f"{len(finished)} of {len(prompts)} job(s) completed", file=sys.stderr)
    return EXIT_OK if not failed else EXIT_FAILED


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a ComfyUI workflow (API or UI format) headless and download its outputs.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workflow", help="workflow JSON file (API or UI format)")
    parser.add_argument("--server", action="append", metavar="URL",
                        help="ComfyUI base URL (default: http://127.0.0.1:8188); repeat to spread a batch over several")
    parser.add_argument("--sweep", action="append", default=[], metavar="NODE.input=[...]",
                        help="run one job per value of the JSON list (repeatable: every combination)")
    parser.add_argument("--batch", metavar="FILE.jsonl", help="run one job per line of overrides {\"NODE.input\": value}")
    parser.add_argument("--per-server", type=int, default=1, metavar="K",
                        help="prompts in flight on each server in a batch (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.input=value",
                        help="override an input (repeatable)")
    parser.add_argument("--map", metavar="FILE", help="JSON {old value: new value} applied to every input value")
    parser.add_argument("--out", default="out", metavar="DIR", help="folder for downloaded outputs (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="give up after this long (default: %(default)s)")
    parser.add_argument("--reconnect-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="single run: fail when the server stays unreachable this long after the "
                             "connection dropped (default: %(default)s)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="run a prompt whose server dropped outputs that failed validation (a warning, not a failure)")
    parser.add_argument("--overwrite", action="store_true",
                        help="batch: replace job folders an earlier batch left in --out (default: refuse)")
    parser.add_argument("--print-prompt", action="store_true", help="print the final API prompt and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    servers = args.server or ["http://127.0.0.1:8188"]
    args.server = servers[0]
    if args.per_server < 1:
        print("error: --per-server must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if not args.reconnect_timeout > 0:
        print("error: --reconnect-timeout must be more than 0", file=sys.stderr)
        return EXIT_USAGE
    batch = len(servers) > 1 or args.sweep or args.batch
    try:
        if batch and not args.print_prompt:
            return asyncio.run(run_batch(args, servers))
        return asyncio.run(run(args))
    except ClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except aiohttp.ClientError as error:
        print(f"error: cannot talk to {args.server}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
