"""HTTP for the site: conditional GET of the index and streamed, capped, resumable, hashed downloads.

Only this module talks to the network. Timeouts apply to the connect and to every read.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sync.errors import DownloadError, RegistryError

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


@dataclass(frozen=True)
class HttpSettings:
    """Timeout per connect/read (s), attempts after the first, backoff base (s), a cap on any body,
    and a limit on one file attempt (s); what is already there is resumed on the next attempt."""

    timeout: float = 20.0
    retries: int = 4
    backoff: float = 1.0
    max_bytes: int = 64 * 1024 * 1024
    # A whole file attempt: a server trickling a byte just inside the read timeout cannot hold a pull.
    transfer_timeout: float = 600.0


@dataclass(frozen=True)
class IndexResponse:
    not_modified: bool
    body: bytes = b""
    etag: str | None = None
    last_modified: str | None = None


class NotFound(DownloadError):
    """HTTP 404: the registry has no such file."""


class Retryable(Exception):
    """A transient failure (5xx, timeout, reset, short body): worth another attempt."""


class RangeRefused(Retryable):
    """HTTP 416: the partial file does not fit what the server has; start that file over."""


def _with_retries(settings: HttpSettings, what: str, attempt: Callable[[], object],
                  sleep: Callable[[float], None] = time.sleep):
    last: Exception | None = None
    for n in range(settings.retries + 1):
        if n:
            delay = settings.backoff * (2 ** (n - 1))
            log.info("retrying %s in %.2f s after: %s", what, delay, last)
            sleep(delay)
        try:
            return attempt()
        except Retryable as exc:
            last = exc
    raise DownloadError(f"{what}: {last} (after {settings.retries + 1} attempts)")


def _open(url: str, headers: dict[str, str], settings: HttpSettings):
    request = urllib.request.Request(url, headers={"User-Agent": "edge-sync/1", **headers})
    try:
        return urllib.request.urlopen(request, timeout=settings.timeout)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return exc
        if exc.code >= 500 or exc.code == 429:
            raise Retryable(f"HTTP {exc.code} from registry") from exc
        if exc.code == 416:
            raise RangeRefused("HTTP 416: the server refused to resume") from exc
        if exc.code == 404:
            raise NotFound(f"{url.rsplit('/', 1)[-1]} not found in the registry (HTTP 404)") from exc
        raise DownloadError(f"HTTP {exc.code} from registry for {url.rsplit('/', 1)[-1]}") from exc
    except (TimeoutError, socket.timeout) as exc:
        raise Retryable(f"timed out after {settings.timeout} s") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise Retryable(f"timed out after {settings.timeout} s") from exc
        raise Retryable(f"cannot reach registry: {exc.reason}") from exc
    except (ConnectionError, http.client.HTTPException) as exc:
        raise Retryable(f"connection failed: {exc!r}") from exc


def _read_capped(response, limit: int, what: str) -> bytes:
    chunks, total = [], 0
    while True:
        try:
            chunk = response.read(CHUNK)
        except (TimeoutError, socket.timeout) as exc:
            raise Retryable("timed out while reading") from exc
        except (ConnectionError, http.client.HTTPException) as exc:
            raise Retryable(f"connection broke while reading: {exc!r}") from exc
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise DownloadError(f"{what} is larger than {limit} bytes; refused")
        chunks.append(chunk)


def _is_html(response, body: bytes) -> bool:
    kind = (response.headers.get("Content-Type") or "").lower()
    return "html" in kind or body.lstrip()[:1] == b"<"


def get_index(url: str, settings: HttpSettings, limit: int, etag: str | None = None,
              last_modified: str | None = None) -> IndexResponse:
    """GET index.json, conditionally; a 304 means the cached verified index still stands."""
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified

    def attempt() -> IndexResponse:
        response = _open(url, headers, settings)
        with response:
            if getattr(response, "code", 200) == 304:
                return IndexResponse(not_modified=True, etag=etag, last_modified=last_modified)
            body = _read_capped(response, limit, "index.json")
            if _is_html(response, body):
                raise RegistryError("registry returned an HTML page for index.json, not the index "
                                    "(wrong URL, or a captive portal / proxy error page)")
            return IndexResponse(False, body, response.headers.get("ETag"), response.headers.get("Last-Modified"))

    return _with_retries(settings, "index.json", attempt)


def get_small(url: str, settings: HttpSettings, limit: int, what: str) -> bytes:
    def attempt() -> bytes:
        with _open(url, {}, settings) as response:
            return _read_capped(response, limit, what)

    return _with_retries(settings, what, attempt)


def download(url: str, dest: Path, size: int, sha256: str, settings: HttpSettings,
             on_chunk: Callable[[int], None] = lambda done: None) -> None:
    """Fetch one file to ``dest`` via ``dest.part``, resuming it with Range; hash while streaming.

    Aborts as soon as more bytes come than the index lists; ``dest`` exists only once its sha256
    matched. A mismatching partial file is deleted so the next attempt starts clean.
    """
    part = dest.with_name(dest.name + ".part")
    name = dest.name

    def attempt() -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        digest = hashlib.sha256()
        if have:
            with open(part, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        resumed = have > 0
        headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
        if have == size:
            response = None
        else:
            try:
                response = _open(url, headers, settings)
            except RangeRefused:
                part.unlink(missing_ok=True)
                raise
        if response is not None:
            started = time.monotonic()
            with response:
                status = getattr(response, "status", 200)
                if have and status != 206:  # the server ignored Range: start over
                    digest, have, resumed = hashlib.sha256(), 0, False
                    part.unlink(missing_ok=True)
                with open(part, "ab") as handle:
                    while True:
                        try:
                            chunk = response.read(CHUNK)
                        except (TimeoutError, socket.timeout) as exc:
                            raise Retryable(f"{name}: timed out after {have} of {size} bytes") from exc
                        except http.client.IncompleteRead as exc:
                            handle.write(exc.partial)
                            digest.update(exc.partial)
                            have += len(exc.partial)
                            raise Retryable(f"{name}: truncated at {have} of {size} bytes") from exc
                        except (ConnectionError, http.client.HTTPException) as exc:
                            raise Retryable(f"{name}: connection broke after {have} bytes: {exc!r}") from exc
                        if not chunk:
                            break
                        if have + len(chunk) > size or have + len(chunk) > settings.max_bytes:
                            handle.close()
                            part.unlink(missing_ok=True)
                            limit = min(size, settings.max_bytes)
                            raise DownloadError(f"{name}: the server sent more than {limit} bytes "
                                                f"({'listed size' if limit == size else 'size cap'}); refused")
                        handle.write(chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        on_chunk(have)
                        if time.monotonic() - started > settings.transfer_timeout:
                            handle.flush()
                            raise Retryable(f"{name}: slower than {settings.transfer_timeout} s "
                                            f"({have} of {size} bytes)")
                    handle.flush()
                    os.fsync(handle.fileno())
        if have < size:
            raise Retryable(f"{name}: truncated at {have} of {size} bytes")
        if digest.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            if resumed:  # the bytes kept from before may be the bad ones: once more from zero
                raise Retryable(f"{name}: sha256 mismatch after resuming; starting over")
            raise DownloadError(f"{name}: sha256 {digest.hexdigest()[:12]}... does not match the signed "
                                f"index {sha256[:12]}...; tampered or corrupt")
        os.replace(part, dest)

    _with_retries(settings, name, attempt)
