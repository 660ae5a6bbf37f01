"""The canonical Moving MNIST file fetched over HTTP: streamed to a partial file, resumed with a Range
request after a cut, and put in place only once its size and sha256 match.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

CHUNK_BYTES = 1 << 20  # download read size: large enough to be fast, small enough for a smooth progress bar


class DownloadError(ValueError):
    """A download that could not be completed or verified: unreachable, cut, refused, or not the file."""


def file_sha256(path: Path, digest: Any = None) -> Any:
    """Feed the bytes of `path` into `digest` (a new sha256 when None) and return it."""
    digest = hashlib.sha256() if digest is None else digest
    with path.open("rb") as handle:
        while block := handle.read(CHUNK_BYTES):
            digest.update(block)
    return digest


def download(url: str, destination: str | Path, sha256: str, size_bytes: int, progress: bool = True) -> Path:
    """Fetch `url` to `destination`, resuming `destination.partial`; the file appears only once verified.

    A destination that already has the right size and checksum is kept as is. A cut connection keeps the
    partial file (the next call resumes it with an HTTP Range request) and raises DownloadError.
    """
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".partial")
    if destination.is_file():
        if destination.stat().st_size == size_bytes and file_sha256(destination).hexdigest() == sha256:
            return destination
        destination.unlink()  # a wrong file must never look like a finished download
    destination.parent.mkdir(parents=True, exist_ok=True)

    offset = partial.stat().st_size if partial.is_file() else 0
    if offset > size_bytes:
        partial.unlink()
        offset = 0
    # The checksum covers the resumed prefix too: hash it now, then the new bytes as they arrive.
    digest = file_sha256(partial) if offset else hashlib.sha256()
    if offset < size_bytes:
        try:
            digest = _fetch(url, partial, offset, size_bytes, digest, progress)
        except OSError as error:  # writing the partial file (the network's errors are DownloadErrors already)
            raise DownloadError(
                f"{partial}: cannot write the download ({error.strerror or error}); free some space or fix "
                "the folder's permissions, then run again to resume"
            ) from None

    actual_size = partial.stat().st_size
    if actual_size != size_bytes:
        partial.unlink()
        problem = "truncated download" if actual_size < size_bytes else "download larger than expected"
        raise DownloadError(
            f"{url}: {problem}, got {actual_size} bytes, expected {size_bytes} (file deleted); check "
            "data.size_bytes and data.url, then run again"
        )
    actual = digest.hexdigest()
    if actual != sha256:
        partial.unlink()
        raise DownloadError(
            f"{url}: checksum mismatch, expected sha256 {sha256}, got {actual} (file deleted); check "
            "data.sha256 and data.url, then run again"
        )
    os.replace(partial, destination)
    return destination


def _fetch(url: str, partial: Path, offset: int, size_bytes: int, digest: Any, progress: bool) -> Any:
    """Append `url` from byte `offset` on to `partial` and `digest`; restart if the server cannot resume."""
    response = _open(url, partial, offset)
    if response is None:  # the server will not serve our range: start over
        return _fetch(url, partial, 0, size_bytes, hashlib.sha256(), progress)
    with response:
        if offset and response.status != 206:
            # The server ignored Range and sends the whole file: start over.
            offset, digest = 0, hashlib.sha256()
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            partial.unlink()
            raise DownloadError(
                f"{url}: server resumed at the wrong place (Content-Range "
                f"{response.headers.get('Content-Range')!r} for byte {offset}); run again to start over"
            )
        received = _receive(response, url, partial, offset, size_bytes, digest, progress)
        # http.client returns b"" (no error) when the peer closes early; the bytes it still expected tell a
        # cut connection (resumable) from a body that was complete but short (reported by `download`).
        missing = response.length
        if missing and received <= size_bytes:
            raise DownloadError(
                f"{url}: connection lost after {received} of {size_bytes} bytes ({missing} bytes of the "
                "response missing); run again to resume"
            )
    return digest


def _open(url: str, partial: Path, offset: int) -> http.client.HTTPResponse | None:
    """The response to a GET of `url` from byte `offset` on; None when the server refuses that range (the
    partial file is then removed)."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # The file changed or the partial is bad.
            partial.unlink()
            return None
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}; check data.url") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"{url}: cannot connect ({reason}); check data.url and the network, or use data.source=generate"
        ) from None


def _receive(
    response: http.client.HTTPResponse,
    url: str,
    partial: Path,
    offset: int,
    size_bytes: int,
    digest: Any,
    progress: bool,
) -> int:
    """Write the response body to `partial` (appended after `offset` bytes) and into `digest`, synced to
    disk; returns the bytes the file then holds."""
    received = offset
    with (
        partial.open("ab" if offset else "wb") as handle,
        tqdm(
            total=size_bytes,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=partial.name.removesuffix(".partial"),
            disable=not progress,
        ) as bar,
    ):
        while True:
            try:
                block = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:
                raise DownloadError(
                    f"{url}: connection lost after {received} of {size_bytes} bytes ({error}); "
                    "run again to resume"
                ) from None
            if not block:
                break
            handle.write(block)
            digest.update(block)
            received += len(block)
            bar.update(len(block))
            if received > size_bytes:
                break  # more than expected: the size check in `download` reports it
        handle.flush()
        os.fsync(handle.fileno())
    return received
