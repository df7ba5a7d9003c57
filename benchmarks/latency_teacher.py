"""A local OpenAI-compatible teacher that answers like a slow API: latency per call and a concurrency cap.

Why: DAgger's teacher in the paper is a large model behind an API, and what costs there is the wait
(hundreds of milliseconds a call, a bounded number of calls at once), not our CPU. This real HTTP server
(stdlib ``http.server``, one thread per request) answers ``POST /v1/chat/completions`` after a latency
drawn per request from ``[min_ms, max_ms]``, at most ``cap`` requests at once (the others queue, as
behind an API's concurrency limit). Its answers are deterministic functions of the request's messages:
a tool call of ``tool`` (default: the first tool whose required arguments are plain strings) whose
arguments carry a digest of the messages, so two collections that reach the same states get the same
labels and any mix-up between states shows. The latency is drawn from the same digest, so side-by-side
runs over the same states wait the same.

Used by ``benchmarks/bench_rollout.py --recipe labels`` (in a subprocess, so its threads never compete
for our interpreter) and by ``tests/test_deferred_labels.py`` (in-process; ``gate`` holds every answer
until released, ``fail_substring`` makes matching states answer HTTP 500).

    python benchmarks/latency_teacher.py --min-ms 300 --max-ms 800 --cap 8   # prints "PORT <n>", serves
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "latency-teacher"


class LatencyTeacher:
    """The server's state and knobs; ``start()`` serves on 127.0.0.1 in a daemon thread."""

    def __init__(
        self,
        min_ms: float = 300.0,
        max_ms: float = 800.0,
        cap: int = 8,
        *,
        tool: str | None = None,
        fail_substring: str | None = None,
    ) -> None:
        if not 0 <= min_ms <= max_ms or cap < 1:
            raise ValueError(f"need 0 <= min_ms <= max_ms and cap >= 1, got {min_ms}, {max_ms}, {cap}")
        self.min_ms, self.max_ms, self.cap = min_ms, max_ms, cap
        self.tool = tool
        self.fail_substring = fail_substring
        self.gate: threading.Event | None = None  # set: answers wait for it (a test's hold)
        self.slots = threading.BoundedSemaphore(cap)
        self.lock = threading.Lock()
        self.requests: list[str] = []  # digest of each request's messages, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd: ThreadingHTTPServer | None = None
        self.url = ""

    # -- what it answers ----------------------------------------------------------------------------

    @staticmethod
    def digest(body: dict[str, Any]) -> str:
        text = json.dumps([body.get("messages"), body.get("tools")], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def latency_s(self, digest: str) -> float:
        """The same state waits the same in every run (drawn from its digest)."""
        u = random.Random(digest).random()
        return (self.min_ms + u * (self.max_ms - self.min_ms)) / 1000.0

    def completion(self, body: dict[str, Any], digest: str) -> dict[str, Any]:
        tool = self._pick_tool(body.get("tools") or [])
        message: dict[str, Any] = {"role": "assistant", "content": f"Teacher label {digest[:12]}."}
        if tool is not None:
            params = tool["function"].get("parameters") or {}
            args = {name: f"label {digest[:12]}" for name in params.get("required", [])}
            message["tool_calls"] = [
                {
                    "id": f"call_{digest[:8]}",
                    "type": "function",
                    "function": {"name": tool["function"]["name"], "arguments": json.dumps(args)},
                }
            ]
        return {
            "id": f"chatcmpl-{digest[:12]}",
            "object": "chat.completion",
            "model": body.get("model", MODEL),
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        }

    def _pick_tool(self, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
        for t in tools:
            fn = t.get("function") or {}
            if self.tool is not None:
                if fn.get("name") == self.tool:
                    return t
                continue
            props = (fn.get("parameters") or {}).get("properties") or {}
            required = (fn.get("parameters") or {}).get("required") or []
            if all(props.get(r, {}).get("type") == "string" and "enum" not in props[r] for r in required):
                return t
        return None

    # -- serving ------------------------------------------------------------------------------------

    def handler(self) -> type[BaseHTTPRequestHandler]:
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as an API client expects

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                digest = teacher.digest(body)
                with teacher.lock:
                    teacher.requests.append(digest)
                with teacher.slots:  # the API's concurrency cap: the rest queue here
                    with teacher.lock:
                        teacher.in_flight += 1
                        teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                    try:
                        time.sleep(teacher.latency_s(digest))
                        if teacher.gate is not None:
                            teacher.gate.wait()
                        text = json.dumps(body.get("messages"))
                        if teacher.fail_substring and teacher.fail_substring in text:
                            self._send(500, {"error": {"message": "injected failure"}})
                        else:
                            self._send(200, teacher.completion(body, digest))
                    finally:
                        with teacher.lock:
                            teacher.in_flight -= 1

        return Handler

    def start(self, port: int = 0) -> LatencyTeacher:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self.handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return self

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--min-ms", type=float, default=300.0)
    parser.add_argument("--max-ms", type=float, default=800.0)
    parser.add_argument("--cap", type=int, default=8, help="requests answered at once; the rest queue")
    parser.add_argument("--tool", default=None, help="the tool every answer calls (default: first plain one)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    teacher = LatencyTeacher(args.min_ms, args.max_ms, args.cap, tool=args.tool).start(args.port)
    assert teacher.httpd is not None
    print(f"PORT {teacher.httpd.server_address[1]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        teacher.stop()
        sys.exit(0)


if __name__ == "__main__":
    main()
