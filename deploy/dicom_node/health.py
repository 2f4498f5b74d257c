"""The node's HTTP endpoint for monitoring: liveness, readiness and Prometheus metrics (off by default)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from .settings import DicomNodeError

logger = logging.getLogger(__name__)

Checks = Callable[[], dict[str, bool]]


class HealthSettings:
    """``health`` in ``dicom_node.json``: ``{"enabled": false, "bind_address": "127.0.0.1", "port": 9112}``."""

    def __init__(self, value: Mapping[str, Any] | None):
        value = dict(value or {})
        unknown = sorted(set(value) - {"enabled", "bind_address", "port"})
        if unknown:
            raise DicomNodeError(f"health: unknown setting(s) {unknown}.")
        self.enabled = bool(value.get("enabled", False))
        self.bind_address = str(value.get("bind_address", "127.0.0.1"))
        try:
            self.port = int(value.get("port", 9112))
        except (TypeError, ValueError) as err:
            raise DicomNodeError(f"health.port must be an integer, got {value.get('port')!r}.") from err
        if not 0 <= self.port < 65536:
            raise DicomNodeError(f"health.port must be 0-65535, got {self.port}.")


def _handler(live: Checks, ready: Checks, metrics: Callable[[], bytes]) -> type[BaseHTTPRequestHandler]:
    routes = {"/livez": live, "/readyz": ready}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics(), CONTENT_TYPE_LATEST)
            elif path in routes:
                checks = routes[path]()
                ok = all(checks.values())
                body = json.dumps({"status": "ok" if ok else "failing", "checks": checks}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b'{"error": "unknown path; use /livez, /readyz or /metrics"}', "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every few seconds would flood the log
            pass

    return Handler


class HealthServer:
    """``/livez`` (the node's threads run), ``/readyz`` (listening, worker alive, disk above the floor; 503 with
    the failing check named otherwise) and ``/metrics`` (Prometheus text format)."""

    def __init__(self, settings: HealthSettings, live: Checks, ready: Checks, metrics: Callable[[], bytes]):
        self.settings = settings
        self._server = ThreadingHTTPServer((settings.bind_address, settings.port), _handler(live, ready, metrics))
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="dicom-node-health", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logger.info("Health and metrics on http://%s:%d (/livez, /readyz, /metrics).", self.settings.bind_address,
                    self.port)  # fmt: skip

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
