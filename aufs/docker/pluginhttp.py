"""HTTP/1.1 over a unix socket, as Docker's plugin client speaks it: POST requests whose bodies
may be chunked (Go sends a stream of unknown length that way), JSON replies with a length,
and streamed replies in chunks. One thread per connection; nothing is held whole in memory.

The calls themselves are the application's business (`aufs.docker.plugin`): it gets a
`PluginCall` and returns a `PluginReply`.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import io
import json
import logging
import os
import socket
import socketserver
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit

from aufs.errors import AufsError

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
STREAM_CHUNK = 1 << 20
JSON_BODY_LIMIT = 1 << 20  # a graphdriver call's JSON is a few ids; refuse anything huge


class PluginProtocolError(AufsError):
    """A request that does not follow HTTP/1.1 as Docker's plugin client sends it."""


class SocketInUseError(AufsError):
    """Another live process answers on the plugin's socket."""


@dataclass(frozen=True)
class PluginCall:
    """One POST: the method ("GraphDriver.Get"), the query and the body, read on demand."""

    method: str
    query: Mapping[str, str]
    body: BinaryIO

    def json(self) -> dict[str, Any]:
        data = self.body.read(JSON_BODY_LIMIT + 1)
        if len(data) > JSON_BODY_LIMIT:
            raise PluginProtocolError(f"{self.method}: the JSON body is over "
                                      f"{JSON_BODY_LIMIT} bytes")
        if not data.strip():
            return {}
        try:
            value = json.loads(data)
        except ValueError as error:
            raise PluginProtocolError(f"{self.method}: the body is not JSON: {error}") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise PluginProtocolError(f"{self.method}: the body is not a JSON object")
        return value


@dataclass
class PluginReply:
    """A JSON payload, or a byte stream sent in chunks (the handler closes it)."""

    status: int = 200
    payload: Mapping[str, Any] = field(default_factory=dict)
    stream: BinaryIO | None = None


Application = Callable[[PluginCall], PluginReply]


class _BodyReader(io.RawIOBase):
    """Base of the two request-body readers; `finished` says whether the body was read to
    its end, so the connection can be kept for the next request."""

    finished = False

    def readable(self) -> bool:
        return True


class LengthBodyReader(_BodyReader):
    """A body of Content-Length bytes."""

    def __init__(self, source: BinaryIO, length: int) -> None:
        self._source = source
        self._left = length
        self.finished = length == 0

    def readinto(self, buffer: Any) -> int:
        if self._left == 0:
            self.finished = True
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        count = self._source.readinto(view)  # type: ignore[attr-defined]
        if not count:
            raise PluginProtocolError(f"the request body ended {self._left} bytes early")
        self._left -= count
        self.finished = self._left == 0
        return int(count)


class ChunkedBodyReader(_BodyReader):
    """A body sent with Transfer-Encoding: chunked (RFC 9112 §7.1)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._left = 0

    def _line(self) -> bytes:
        line = self._source.readline(1024)
        if not line.endswith(b"\n"):
            raise PluginProtocolError("the chunked request body ends inside a chunk header")
        return line

    def readinto(self, buffer: Any) -> int:
        # Go's client sends a layer in chunks as small as one 512-byte tar header: fill the
        # caller's buffer from as many chunks as it takes (the sender never waits for us).
        view = memoryview(buffer)
        filled = 0
        while filled < len(view) and not self.finished:
            if self._left == 0:
                self._next_chunk()
                continue
            count = self._source.readinto(  # type: ignore[attr-defined]
                view[filled: filled + min(len(view) - filled, self._left)])
            if not count:
                raise PluginProtocolError("the chunked request body ends inside a chunk")
            filled += count
            self._left -= count
            if self._left == 0 and self._source.read(2).strip():
                raise PluginProtocolError("a chunk does not end with CRLF")
        return filled

    def _next_chunk(self) -> None:
        header = self._line().split(b";", 1)[0].strip()
        try:
            self._left = int(header, 16)
        except ValueError:
            raise PluginProtocolError(f"bad chunk size {header[:20]!r}") from None
        if self._left < 0:
            raise PluginProtocolError(f"bad chunk size {header[:20]!r}")
        if self._left == 0:
            while self._line().strip():  # trailer fields, then the empty line
                pass
            self.finished = True


class PluginRequestHandler(http.server.BaseHTTPRequestHandler):
    """Turns each POST into a PluginCall for the server's application."""

    protocol_version = "HTTP/1.1"
    rbufsize = STREAM_CHUNK  # Go writes a layer in small chunks: read the socket in big gulps
    server: PluginServer

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        method = url.path.lstrip("/")
        try:
            raw = self._body_reader()
        except PluginProtocolError as error:
            self._send_json(400, {"Err": str(error)})
            return
        call = PluginCall(method, dict(parse_qsl(url.query)),
                          io.BufferedReader(raw, STREAM_CHUNK))
        try:
            reply = self.server.application(call)
        except PluginProtocolError as error:
            reply = PluginReply(400, {"Err": str(error)})
        except Exception as error:  # the application answers errors itself; this is a bug
            log.exception("%s failed", method)
            reply = PluginReply(500, {"Err": f"{method}: {type(error).__name__}: {error}"})
        if not raw.finished and not _drain(raw, JSON_BODY_LIMIT):
            self.close_connection = True  # the rest of the body is still on the wire
        if reply.stream is None:
            self._send_json(reply.status, reply.payload)
        else:
            self._send_stream(reply.stream)

    def _body_reader(self) -> _BodyReader:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return ChunkedBodyReader(self.rfile)  # type: ignore[arg-type]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise PluginProtocolError("bad Content-Length")
        return LengthBodyReader(self.rfile, length)  # type: ignore[arg-type]

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, stream: BinaryIO) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                chunk = stream.read(STREAM_CHUNK)
                if not chunk:
                    break
                self.wfile.write(b"%x\r\n" % len(chunk))
                self.wfile.write(chunk)
                self.wfile.write(b"\r\n")
        except Exception as error:
            # Cut the connection without the last chunk: the client sees a broken stream,
            # never a short tar that looks whole.
            log.warning("%s: the stream broke: %s", self.path, error)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            stream.close()
        self.wfile.write(b"0\r\n\r\n")

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # Docker's client reads {"Err": ...} from any reply that is not 200.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._send_json(code, {"Err": message or http.HTTPStatus(code).phrase})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)  # a unix socket has no client address to show


def _drain(body: _BodyReader, limit: int) -> bool:
    """Reads what the application left of a small body, so that the connection can serve
    the next call; False when the body is bigger than limit or broken."""
    buffer = bytearray(65536)
    try:
        while limit > 0 and body.readinto(buffer):
            limit -= len(buffer)
    except PluginProtocolError:
        return False
    return body.finished


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves `application` on a unix socket. A stale socket left by a killed plugin is
    replaced; one that a live process answers on is not. Closing removes the socket, unless
    another process has bound a new one there since."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, application: Application, *, mode: int = 0o660) -> None:
        self.application = application
        self.socket_path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        _remove_stale_socket(self.socket_path)
        super().__init__(self.socket_path, PluginRequestHandler)
        os.chmod(self.socket_path, mode)
        self._inode = os.stat(self.socket_path).st_ino

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUseError(f"{path} exists and is not a socket; remove it or choose "
                               "another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("removing the stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketInUseError(f"another process serves {path}; stop it first")
