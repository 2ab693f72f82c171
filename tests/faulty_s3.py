"""A fault-injecting HTTP proxy for tests: sits on loopback in front of the moto S3 server and,
per rule, answers 503, resets the connection, denies (403) or says the object is gone (404)
instead of forwarding.

The job is pointed at it with ``AWS_ENDPOINT_URL`` like at any S3 endpoint, so the faults reach
botocore/s3fs exactly as a flaky or misconfigured object store would send them; nothing in the
pipeline is patched.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Hop-by-hop headers are the proxy's own business (RFC 9110 §7.6.1); the rest passes unchanged,
# so SigV4 signatures and checksums arrive as the client made them.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Rule:
    """Answer ``action`` ("503", "reset", "403" or "404") to the first ``times`` requests (None: all)
    whose method is ``method`` (None: any) and whose decoded path matches the regex ``path``."""

    action: str
    path: str
    method: str | None = None
    times: int | None = None
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if self.method not in (None, method) or not re.search(self.path, path):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class FaultyS3:
    """``with FaultyS3(moto_endpoint) as proxy:`` → ``proxy.endpoint``; add rules with ``proxy.fail``."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, int | str]] = []  # (method, path, status or action)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, action: str, path: str, *, method: str | None = None, times: int | None = None) -> Rule:
        rule = Rule(action, path, method, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def count(self, method: str, path: str) -> int:
        """Requests seen (forwarded or failed) with this method whose path matches the regex."""
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and re.search(path, p))

    def __enter__(self) -> FaultyS3:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                if rule.take(method, path):
                    return rule.action
        return None

    def _record(self, method: str, path: str, outcome: int | str) -> None:
        with self._lock:
            self.requests.append((method, path, outcome))

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]  # chunk data then CRLF
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(chunk)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                # A HEAD answer has no body but announces the object's length: keep upstream's.
                length = (
                    dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
                )
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>"
                ).encode()
                self._answer(status, body, [("Content-Type", "application/xml")])

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout makes close() send RST: "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                body = self._body()
                path = unquote(urlsplit(self.path).path)
                action = proxy._decide(self.command, path)
                if action is not None:
                    proxy._record(self.command, path, action)
                    if action == "reset":
                        return self._reset()
                    if action == "503":
                        return self._error(503, "ServiceUnavailable", "Service is unable to handle request.")
                    if action == "403":
                        return self._error(403, "AccessDenied", "Access Denied")
                    if action == "404":
                        return self._error(404, "NoSuchKey", "The specified key does not exist.")
                    raise ValueError(f"unknown fault action {action!r}")
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if self.command in ("PUT", "POST") or body:
                        headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    proxy._record(self.command, path, response.status)
                    self._answer(response.status, data, response.getheaders())
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
