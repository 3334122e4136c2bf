"""A client of the OCI Distribution API v2 (Docker registries), on the standard library.

http.client does all this needs: streamed bodies, one connection per thread, and redirects
followed by hand so that credentials never travel to another host (blob storage). Auth is
anonymous, basic, or a bearer token fetched from the WWW-Authenticate challenge's realm.
Plain HTTP is used only when asked (insecure=True) or for a registry on localhost.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import http.client
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aufs.errors import AufsError
from aufs.images.digests import parse_digest

log = logging.getLogger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
USER_AGENT = "aufs/0.1"
# Limits on what a registry may send, as Docker and containerd have them.
MANIFEST_LIMIT = 4 << 20  # a manifest, an index or an image config
TOKEN_LIMIT = 1 << 20
ERROR_BODY_LIMIT = 4 << 10
TIMEOUT = 60.0  # seconds of silence on any one connection
MAX_RETRY_WAIT = 30.0


class RegistryError(AufsError):
    """The registry answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class RegistryAuthError(RegistryError):
    """401 or 403: the credentials are missing, wrong, or lack the rights."""


class RegistryNotFoundError(RegistryError, LookupError):
    """404: no such repository, tag, manifest or blob."""


@dataclass(frozen=True)
class Reference:
    """REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:..."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The tag or digest, as the manifests endpoint takes it."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{self.registry}/{self.repository}{suffix}"

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest, _, digest = text.partition("@")
        registry, slash, path = rest.partition("/")
        if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
            raise ValueError(f"{text!r} names no registry: write HOST[:PORT]/REPOSITORY:TAG")
        tag = None
        if ":" in path.rsplit("/", 1)[-1]:
            path, _, tag = path.rpartition(":")
        if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*",
                            path):
            raise ValueError(f"{path!r} is not a repository name (lowercase, digits, ._-/)")
        if tag is not None and not re.fullmatch(r"[\w][\w.-]{0,127}", tag):
            raise ValueError(f"{tag!r} is not a tag")
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"{digest!r} is not a sha256 digest")
        return cls(registry, path, tag, digest or None)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def docker_config_credentials(registry: str, path: str | None = None) -> Credentials | None:
    """Credentials for registry from ~/.docker/config.json (`docker login` writes them)."""
    path = path or os.path.join(os.environ.get("DOCKER_CONFIG", os.path.expanduser("~/.docker")),
                                "config.json")
    try:
        with open(path) as handle:
            auths = json.load(handle).get("auths", {})
    except (OSError, ValueError):
        return None
    for key, entry in auths.items():
        host = urllib.parse.urlparse(key).netloc if "://" in key else key
        if host == registry and entry.get("auth"):
            username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return Credentials(username, password)
    return None


def retry_after(value: str, attempt: int) -> float:
    """Seconds to wait before retrying a 429: Retry-After as seconds or as an HTTP date
    (RFC 9110), else exponential backoff; never negative, never more than MAX_RETRY_WAIT."""
    wait = 2 ** attempt / 4
    value = value.strip()
    if value:
        try:
            wait = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=datetime.UTC)
                wait = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    if wait != wait:  # NaN
        wait = 0.0
    return float(min(max(wait, 0.0), MAX_RETRY_WAIT))


def _origin(scheme: str, netloc: str) -> tuple[str, int | None]:
    """Host and port, the scheme's default port made explicit ("reg" is "reg:443")."""
    parts = urllib.parse.urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        return (netloc, None)
    default = {"https": 443, "http": 80}.get(scheme)
    return ((parts.hostname or "").lower(), port if port is not None else default)


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class RegistryClient:
    """Requests to one repository of one registry; safe to use from several threads."""

    def __init__(self, reference: Reference, credentials: Credentials | None = None,
                 insecure: bool = False, retries: int = 4, timeout: float = TIMEOUT) -> None:
        self.reference = reference
        self.insecure = insecure
        self.timeout = timeout
        self.credentials = credentials
        host = reference.registry.rsplit(":", 1)[0] if not reference.registry.startswith("[") \
            else reference.registry
        self.scheme = "http" if insecure or host in LOCAL_HOSTS else "https"
        self.retries = retries
        self._local = threading.local()
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._lock = threading.Lock()

    # ---- plumbing -------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.reference.registry}/v2/{self.reference.repository}{path}"

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        cache: dict[tuple[str, str], http.client.HTTPConnection] = getattr(
            self._local, "connections", {})
        self._local.connections = cache
        connection = cache.get((scheme, netloc))
        if connection is None:
            if scheme == "https":
                connection = http.client.HTTPSConnection(netloc, timeout=self.timeout,
                                                          context=ssl.create_default_context())
            elif scheme == "http":
                connection = http.client.HTTPConnection(netloc, timeout=self.timeout)
            else:
                raise RegistryError(f"cannot follow a {scheme or 'relative'}: URL ({netloc})")
            cache[(scheme, netloc)] = connection
        return connection

    def _forget_connection(self, response: http.client.HTTPResponse) -> None:
        """Closes the connection a response came on: its body was not read to the end, so
        the next response on it would be out of step."""
        key = getattr(response, "aufs_connection", None)
        cache = getattr(self._local, "connections", {})
        connection = cache.pop(key, None)
        response.close()
        if connection is not None:
            connection.close()

    def read_body(self, response: http.client.HTTPResponse, limit: int, what: str) -> bytes:
        """The whole body, or RegistryError when it is longer than limit."""
        try:
            data = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as error:
            self._forget_connection(response)
            raise RegistryError(f"{what}: the connection failed: {error}") from error
        if len(data) > limit:
            self._forget_connection(response)
            raise RegistryError(f"{what} is larger than {limit} bytes: refused")
        return data

    def discard(self, response: http.client.HTTPResponse) -> bytes:
        """The start of a body nobody needs (an error, a redirect): a few KiB at most; the
        connection is dropped when there was more."""
        try:
            data = response.read(ERROR_BODY_LIMIT)
        except (OSError, http.client.HTTPException):
            data = b""
        if not response.isclosed():
            self._forget_connection(response)
        return data

    def _authorization(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
            basic = self._basic
        if token:
            return {"Authorization": f"Bearer {token}"}
        if basic and self.credentials:
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _may_carry_credentials(self, url: str) -> bool:
        """Credentials (Basic, or the registry's token) go to the registry itself only: the
        same host and port, and never from https down to plain http."""
        parts = urllib.parse.urlsplit(url)
        if self.scheme == "https" and parts.scheme != "https":
            return False
        return _origin(parts.scheme, parts.netloc) == _origin(self.scheme,
                                                               self.reference.registry)

    def _authenticate(self, challenge: str, scope: str) -> bool:
        """Answers a 401 challenge; False when there is nothing more to try."""
        scheme, fields = _parse_challenge(challenge)
        if scheme == "basic":
            with self._lock:
                if self._basic or self.credentials is None:
                    return False
                self._basic = True
            return True
        if scheme != "bearer" or "realm" not in fields:
            raise RegistryAuthError(f"unsupported authentication challenge {challenge!r}", 401)
        query = {"service": fields.get("service", ""), "scope": fields.get("scope", scope)}
        realm = fields["realm"] + "?" + urllib.parse.urlencode(
            {key: value for key, value in query.items() if value})
        headers = {}
        if self.credentials and self._may_send_to_realm(fields["realm"]):
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        elif self.credentials:
            log.warning("not sending credentials to the token service %s: it is plain http "
                        "on another host; asking for an anonymous token", fields["realm"])
        response, _ = self._send("GET", realm, headers, None, follow=True, credentials_to=realm)
        if response.status != 200:
            body = self.discard(response)
            raise RegistryAuthError(f"the token service at {fields['realm']} refused "
                                    f"({response.status}): {body[:200]!r}", response.status)
        body = self.read_body(response, TOKEN_LIMIT, f"the token from {fields['realm']}")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not token or not isinstance(token, str):
            raise RegistryAuthError("the token service answered without a token", 401)
        with self._lock:
            if self._tokens.get(scope) == token:
                return False
            self._tokens[scope] = token
        return True

    def _may_send_to_realm(self, realm: str) -> bool:
        """The token service may live on another host (auth.docker.io) when it speaks https;
        over plain http only on the registry's own host, and never as an https downgrade."""
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme == "https":
            return True
        registry_host = urllib.parse.urlsplit(f"//{self.reference.registry}").hostname
        return parts.scheme == "http" and self.scheme == "http" and \
            parts.hostname == registry_host

    def _send(self, method: str, url: str, headers: Mapping[str, str], body: Any,
              follow: bool, credentials_to: str | None = None
              ) -> tuple[http.client.HTTPResponse, str]:
        """One request, with redirects followed, and the URL that answered. Authorization
        goes only where _may_carry_credentials allows (or to `credentials_to`, the token
        service, unless a redirect leaves it): never to another host, never down to http."""
        for _ in range(6):
            parts = urllib.parse.urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            connection = self._connection(parts.scheme, parts.netloc)
            sent = {"User-Agent": USER_AGENT, **headers}
            if url != credentials_to and not self._may_carry_credentials(url):
                sent.pop("Authorization", None)
            try:
                connection.request(method, path, body=body, headers=sent)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                self._local.connections.pop((parts.scheme, parts.netloc), None)
                raise RegistryError(f"cannot reach {parts.netloc}: {error}") from error
            response.aufs_connection = (parts.scheme, parts.netloc)  # type: ignore[attr-defined]
            if follow and response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location", "")
                self.discard(response)
                target = urllib.parse.urljoin(url, location)
                if parts.scheme == "https" and urllib.parse.urlsplit(target).scheme != "https" \
                        and not self.insecure:
                    raise RegistryError(f"{parts.netloc} redirected from https to {target}: "
                                        "refused (plain http needs --insecure)")
                url = target
                if response.status == 303:
                    method, body = "GET", None
                continue
            return response, url
        raise RegistryError(f"too many redirects for {url}")

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                body: Any = None, expect: tuple[int, ...] = (200,), follow: bool = True,
                scope: str | None = None) -> http.client.HTTPResponse:
        """A request with auth, 429 retries and errors turned into RegistryError; returns
        the response with its body unread."""
        scope = scope or f"repository:{self.reference.repository}:pull"
        attempts = 0
        while True:
            attempts += 1
            response, answered = self._send(
                method, url, {**(headers or {}), **self._authorization(scope)}, body, follow)
            if response.status == 401 and attempts <= 3:
                challenge = response.getheader("WWW-Authenticate", "")
                self.discard(response)
                # only the registry itself may ask for credentials, not where it redirected
                if challenge and self._may_carry_credentials(answered) and \
                        self._authenticate(challenge, scope):
                    continue
                raise RegistryAuthError(
                    f"{urllib.parse.urlsplit(answered).netloc} refused the credentials for "
                    f"{self.reference.repository} (401); log in, or pass --username/--password",
                    401)
            if response.status == 429 and attempts <= self.retries:
                wait = retry_after(response.getheader("Retry-After", ""), attempts)
                self.discard(response)
                log.debug("%s: too many requests (retrying %d/%d in %.1f s)", url, attempts,
                          self.retries, wait)
                time.sleep(wait)
                continue
            if response.status in expect:
                return response
            detail = self.discard(response)[:300].decode(errors="replace").strip()
            if response.status == 403:
                raise RegistryAuthError(f"{url}: forbidden (403): {detail}", 403)
            if response.status == 404:
                raise RegistryNotFoundError(f"{url}: not found (404): {detail}", 404)
            if response.status == 429:
                raise RegistryError(f"{url}: still too many requests after {self.retries} "
                                    "retries (429); try again later", 429)
            raise RegistryError(f"{method} {url}: {response.status} {response.reason}: "
                                f"{detail}", response.status)

    # ---- the API --------------------------------------------------------------------------

    def get_manifest(self, name: str) -> tuple[bytes, str, str | None]:
        """(body, media type, Docker-Content-Digest) of a manifest or index."""
        if ":" in name:
            parse_digest(name)
        response = self.request("GET", self.url(f"/manifests/{name}"),
                                {"Accept": ", ".join(MANIFEST_TYPES)})
        body = self.read_body(response, MANIFEST_LIMIT, f"the manifest {name!r}")
        media_type = response.getheader("Content-Type", "").split(";")[0]
        return body, media_type, response.getheader("Docker-Content-Digest")

    def open_blob(self, digest: str) -> http.client.HTTPResponse:
        parse_digest(digest)
        return self.request("GET", self.url(f"/blobs/{digest}"))

    def read_blob(self, digest: str, limit: int = MANIFEST_LIMIT) -> bytes:
        """A small blob (an image config) read whole, up to limit bytes."""
        return self.read_body(self.open_blob(digest), limit, f"the blob {digest}")

    def has_blob(self, digest: str) -> bool:
        scope = f"repository:{self.reference.repository}:pull,push"
        try:
            response = self.request("HEAD", self.url(f"/blobs/{digest}"), scope=scope)
        except RegistryNotFoundError:
            return False
        self.discard(response)
        return True

    def mount_blob(self, digest: str, source_repository: str) -> bool:
        """Cross-repository mount; False when the registry starts an upload instead."""
        scope = f"repository:{self.reference.repository}:pull,push"
        query = urllib.parse.urlencode({"mount": digest, "from": source_repository})
        response = self.request("POST", self.url(f"/blobs/uploads/?{query}"),
                                {"Content-Length": "0"}, b"", expect=(201, 202), scope=scope)
        self.discard(response)
        if response.status == 202:  # not mounted: cancel the upload it opened
            location = response.getheader("Location")
            if location:
                with contextlib.suppress(RegistryError):  # it expires on its own anyway
                    self.discard(self.request(
                        "DELETE", urllib.parse.urljoin(self.url("/"), location),
                        expect=(204, 404), scope=scope))
        return response.status == 201

    def upload_blob(self, digest: str, path: str, chunk_size: int = 0,
                    on_bytes: Any = None) -> None:
        """Uploads the file at path as blob digest: one PUT, or PATCH chunks then a PUT."""
        scope = f"repository:{self.reference.repository}:pull,push"
        response = self.request("POST", self.url("/blobs/uploads/"), {"Content-Length": "0"},
                                b"", expect=(202,), scope=scope)
        self.discard(response)
        location = urllib.parse.urljoin(self.url("/"), response.getheader("Location", ""))
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            if chunk_size and size > chunk_size:
                offset = 0
                while offset < size:
                    chunk = handle.read(chunk_size)
                    response = self.request(
                        "PATCH", location,
                        {"Content-Type": "application/octet-stream",
                         "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                         "Content-Length": str(len(chunk))},
                        chunk, expect=(202,), scope=scope, follow=False)
                    self.discard(response)
                    location = urllib.parse.urljoin(location, response.getheader("Location", ""))
                    offset += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                body: Any = b""
                length = 0
            else:
                body, length = handle, size
            separator = "&" if "?" in location else "?"
            response = self.request(
                "PUT", f"{location}{separator}digest={urllib.parse.quote(digest)}",
                {"Content-Type": "application/octet-stream", "Content-Length": str(length)},
                body, expect=(201,), scope=scope, follow=False)
            self.discard(response)
        if on_bytes is not None and not chunk_size:
            on_bytes(size)

    def put_manifest(self, name: str, body: bytes, media_type: str) -> str:
        scope = f"repository:{self.reference.repository}:pull,push"
        response = self.request("PUT", self.url(f"/manifests/{name}"),
                                {"Content-Type": media_type, "Content-Length": str(len(body))},
                                body, expect=(201,), scope=scope)
        self.discard(response)
        return response.getheader("Docker-Content-Digest", "")
