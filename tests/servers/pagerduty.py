"""A local HTTP server speaking the PagerDuty Events API v2 contract, for tests.

It validates each body as PagerDuty does (routing_key, event_action, dedup_key,
and for triggers a payload with summary, source and a known severity), answers
202 like the real API, keeps what it accepted, and can be told to fail (500)
to simulate an outage.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEVERITIES = {"critical", "error", "warning", "info"}


def problems(body) -> list[str]:
    found = []
    if not isinstance(body, dict):
        return ["body is not an object"]
    if not body.get("routing_key"):
        found.append("routing_key missing")
    if body.get("event_action") not in ("trigger", "acknowledge", "resolve"):
        found.append("event_action invalid")
    if body.get("event_action") in ("acknowledge", "resolve") and not body.get("dedup_key"):
        found.append("dedup_key missing")
    if body.get("event_action") == "trigger":
        payload = body.get("payload") or {}
        for key in ("summary", "source", "severity"):
            if not payload.get(key):
                found.append(f"payload.{key} missing")
        if payload.get("severity") not in SEVERITIES:
            found.append("payload.severity invalid")
        if len(payload.get("summary", "")) > 1024:
            found.append("payload.summary longer than 1024")
    return found


class FakePagerDuty:
    def __init__(self):
        self.accepted: list[dict] = []
        self.rejected: list[tuple[dict, list[str]]] = []
        self.failing = False
        self.refused = 0  # requests answered 500 while failing
        self.cond = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if owner.failing:
                    with owner.cond:
                        owner.refused += 1
                        owner.cond.notify_all()
                    self.send_response(500)
                    self.end_headers()
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    body, issues = raw, ["not JSON"]
                else:
                    issues = problems(body)
                with owner.cond:
                    if issues:
                        owner.rejected.append((body, issues))
                    else:
                        owner.accepted.append(body)
                    owner.cond.notify_all()
                self.send_response(400 if issues else 202)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                answer = {"status": "invalid event", "errors": issues} if issues else \
                    {"status": "success", "message": "Event processed", "dedup_key": body.get("dedup_key")}
                self.wfile.write(json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 15.0) -> list[dict]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.accepted) >= count, timeout)
            return list(self.accepted)

    def wait_refused(self, count: int, timeout: float = 15.0) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.refused >= count, timeout)
            return self.refused

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
