"""Reading a shard folder: the contract between `make shards` (frrn_dist.shards) and the loaders.

A shard folder is finished only when its manifest.json exists: the packer writes it last, after every tar and
index is complete, so a folder without it is an interrupted run and is refused here.

The folder may also be a URL, read by the streaming loader (frrn_dist.data.stream):

    http(s)://host/path/          plain HTTP GETs (Range requests to resume or to start inside a tar)
    s3://bucket/prefix/           fsspec (s3fs) where installed, else `aws s3 cp URL -`
    gs://bucket/prefix/           fsspec (gcsfs) where installed, else `gcloud storage cat URL`
    pipe:COMMAND {}               webdataset's pipe: handler, `{}` replaced by the file name (any reader command)

`location(shard_dir, name)` names one file of the folder; `open_location` reads it as a stream that retries
transient failures (connection refused or reset, timeouts, HTTP 408/429/5xx, a failing pipe command) with
exponential backoff, a bounded number of times, reopening at the byte it got to. A 404, a missing file, or a
file shorter or longer than the manifest says fails at once with one line naming the URL.

Imports: fsspec, webdataset.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import shlex
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT = "frrn-dist-shards/1"
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "pipe:")
RETRIES = 4  # attempts after the first; with BACKOFF_S the waits are 0.5, 1, 2, 4 s (7.5 s in all)
BACKOFF_S = 0.5
TIMEOUT_S = 60.0  # a read that stalls this long counts as a transient failure
_TRANSIENT_HTTP = (408, 425, 429, 500, 502, 503, 504)

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A shard folder, split or file that cannot be used; the message names it."""


class MissingFile(ShardError):
    """A file of a shard folder that is not there: an HTTP 404, no such local file."""


def is_url(shard_dir: str | Path) -> bool:
    """True for a shard folder given as a URL or pipe: template (read by data.backend=stream only)."""
    return isinstance(shard_dir, str) and shard_dir.startswith(URL_SCHEMES)


def location(shard_dir: str | Path, name: str) -> str:
    """The path or URL of file `name` of a shard folder (`{}` of a pipe: template replaced by it)."""
    if not is_url(shard_dir):
        return str(Path(shard_dir) / name)
    if shard_dir.startswith("pipe:"):
        if "{}" not in shard_dir:
            raise ShardError(f"{shard_dir}: a pipe: shard folder needs '{{}}' where the file name goes")
        return shard_dir.replace("{}", name)
    return shard_dir.rstrip("/") + "/" + name


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load `shard_dir/manifest.json`, or raise ShardError saying why the folder is not usable."""
    if is_url(shard_dir):
        path = location(shard_dir, MANIFEST_NAME)
        try:
            with open_location(path) as f:
                text = f.read().decode("utf-8", "replace")
        except MissingFile as e:
            raise ShardError(f"{e}: so {shard_dir} is not a finished shard folder") from None
    else:
        path = Path(shard_dir) / MANIFEST_NAME
        if not Path(shard_dir).is_dir():
            raise ShardError(f"{shard_dir}: no such shard folder (make it with `make shards` or `make demo`)")
        if not path.is_file():
            raise ShardError(f"{path}: missing, so {shard_dir} is not a finished shard folder (re-run `make shards`)")
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{path}: format {got!r}, expected {FORMAT!r}")
    return manifest


def split_info(shard_dir: str | Path, split: str) -> dict[str, Any]:
    """The manifest entry of one split: num_samples, height, width, components, class_pixels, shards."""
    splits = read_manifest(shard_dir)["splits"]
    if split not in splits:
        raise ShardError(f"{location(shard_dir, MANIFEST_NAME)}: no split {split!r} (has {sorted(splits)})")
    return splits[split]


def split_files(shard_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Absolute paths of a split's tars and their DALI indexes, in the same order; each must exist."""
    if is_url(shard_dir):
        raise ShardError(
            f"{shard_dir}: a URL; DALI and the torch backend read files (local or on a shared filesystem): "
            "use data.backend=stream to read shards over the network"
        )
    root = Path(shard_dir).resolve()
    tars, idxs = [], []
    for shard in split_info(shard_dir, split)["shards"]:
        tar, idx = root / shard["tar"], root / shard["idx"]
        if not tar.is_file():
            raise ShardError(f"{tar}: shard listed in the manifest is missing")
        if not idx.is_file():
            raise ShardError(f"{idx}: DALI index of {tar.name} is missing (re-run `make shards`)")
        tars.append(str(tar))
        idxs.append(str(idx))
    return tars, idxs


# --------------------------------------------------------------------------------------------------------------------
# Reading one file of a shard folder, local or remote, with retries


def _fsspec_open(url: str):
    """An fsspec file for s3:// or gs:// when its filesystem package (s3fs, gcsfs) is installed, else None."""
    try:
        import fsspec

        fsspec.get_filesystem_class(url.split(":", 1)[0])
    except (ImportError, ValueError):
        return None
    return fsspec.open(url, "rb").open()


def _cli_pipe(url: str) -> str:
    """The pipe: command that streams an object store URL with the provider's own CLI (its credentials)."""
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(url)} -"
    return f"pipe:gcloud storage cat {shlex.quote(url)}"


class RemoteFile:
    """A read-only byte stream of one shard file that survives transient failures (see the module docstring).

    start: first byte to deliver (HTTP asks with a Range header; a pipe reads and drops the bytes before it).
    expected_bytes: the size the manifest gives; a different size fails with one line naming the URL.
    """

    def __init__(self, url: str, *, start: int = 0, expected_bytes: int | None = None, retries: int = RETRIES,
                 backoff_s: float = BACKOFF_S, timeout_s: float = TIMEOUT_S):  # fmt: skip
        self.url, self.pos, self.expected_bytes = url, start, expected_bytes
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.attempts = 0  # failed attempts so far
        self._f = None
        self._end: int | None = None  # the size the source itself declares (Content-Length, file size), if any
        self._eof = False
        self._retrying(None)

    def __repr__(self) -> str:  # webdataset's tar iterator puts the stream into its messages
        return self.url

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, size: int = -1) -> bytes:
        if size >= 0:
            return self._retrying(size)
        chunks = []  # the rest, in pieces, so a retry in the middle keeps what came before
        while chunk := self._retrying(1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):  # a pipe closed early exits on SIGPIPE: nothing more to read
                self._f.close()
            self._f = None

    def _read(self, size: int) -> bytes:
        data = self._f.read(size)
        self.pos += len(data)
        if data:
            self.attempts = 0  # the budget is per failure episode: a long read may survive several blips
        if data or size == 0:
            if self.expected_bytes is not None and self.pos > self.expected_bytes:
                raise ShardError(f"{self.url}: longer than the {self.expected_bytes} bytes the manifest says")
            return data
        # The end. A connection dropped before its Content-Length or a failed command (a pipe's close() raises
        # for a non-zero exit) is transient; a source that is itself shorter than the manifest says is truncated.
        f, self._f = self._f, None
        f.close()
        if self._end is not None and self.pos < self._end:
            raise http.client.IncompleteRead(data, self._end - self.pos)
        if self.expected_bytes is not None and self.pos < self.expected_bytes:
            raise ShardError(f"{self.url}: truncated: ends at byte {self.pos}, the manifest says {self.expected_bytes}")
        self._eof = True
        return data

    def _open(self) -> None:
        url = self.url
        if url.startswith(("http://", "https://")):
            self._f = self._open_http()
            return
        if not is_url(url):
            if not Path(url).is_file():
                raise MissingFile(f"{url}: missing")
            self._f = open(url, "rb")  # noqa: SIM115 (closed by close())
            self._f.seek(self.pos)
            self._check_size(Path(url).stat().st_size)
            return
        f = _fsspec_open(url) if url.startswith(("s3://", "gs://")) else None
        if f is not None:
            self._check_size(getattr(f, "size", None))
            f.seek(self.pos)
        else:
            import webdataset as wds

            f = wds.gopen(url if url.startswith("pipe:") else _cli_pipe(url), "rb")
            _drop(f, self.pos)  # a pipe cannot seek
        self._f = f

    def _open_http(self):
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        try:
            r = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise MissingFile(f"{self.url}: HTTP 404 {e.reason}") from None
            if e.code not in _TRANSIENT_HTTP:
                raise ShardError(f"{self.url}: HTTP {e.code} {e.reason}") from None
            raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
        length = r.headers.get("Content-Length")
        if r.status == 206:
            span, _, total = r.headers.get("Content-Range", "").rpartition("/")
            if span.split(" ")[-1].split("-")[0] != str(self.pos):
                raise ShardError(f"{self.url}: asked for bytes from {self.pos}, the server sent {span!r}")
            self._end = int(total) if total.isdigit() else None
        else:  # 200: the whole file (the server ignores Range): drop what was delivered before
            self._end = int(length) if length and length.isdigit() else None
        self._check_size(self._end)
        if r.status != 206:
            _drop(r, self.pos)
        return r

    def _check_size(self, size: int | None) -> None:
        self._end = size
        if size is not None and self.expected_bytes is not None and size != self.expected_bytes:
            raise ShardError(
                f"{self.url}: {size} bytes, the manifest says {self.expected_bytes} (truncated or replaced: "
                "re-upload the shard folder)"
            )

    def _retrying(self, size: int | None):
        """Read `size` bytes (None: only open); on a transient failure wait, reopen at self.pos, try again."""
        while True:
            try:
                if self._eof:
                    return b""
                if self._f is None:
                    self._open()
                return None if size is None else self._read(size)
            except ShardError:
                self.close()
                raise
            except (OSError, http.client.HTTPException) as e:
                # OSError: refused/reset connections, timeouts, urllib's URLError, a pipe's non-zero exit
                self.close()
                if self.attempts >= self.retries:
                    raise ShardError(
                        f"{self.url}: {_reason(e)} (gave up after {self.attempts + 1} attempts, at byte {self.pos})"
                    ) from None
                wait_s = self.backoff_s * 2**self.attempts
                self.attempts += 1
                log.warning(f"{self.url}: {_reason(e)}; retry {self.attempts}/{self.retries} in {wait_s:.2f} s")
                time.sleep(wait_s)


def _drop(f, num_bytes: int) -> None:
    """Read and discard the first num_bytes of a stream that cannot seek."""
    while num_bytes > 0:
        chunk = f.read(min(num_bytes, 1 << 20))
        if not chunk:
            raise http.client.IncompleteRead(b"", num_bytes)
        num_bytes -= len(chunk)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def open_location(url: str, **kw) -> RemoteFile:
    """Open one file of a shard folder (path or URL) for reading; see RemoteFile. Not there: MissingFile."""
    return RemoteFile(url, **kw)
