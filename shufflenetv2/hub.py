"""Fetching MindCV's released ShuffleNetV2 checkpoints into a local cache.

The files are only ever trusted after their SHA-256 has been checked against the prefix MindCV puts in
every released file name, so a proxy's error page, a truncated transfer or a file silently replaced on
the server is caught here rather than as a baffling parse error later.  Downloads go to a temporary file
in the destination directory and are moved into place with ``os.replace``: an interrupted or failed
download never leaves a half-written file under the final name, and never destroys a good one.

Environment variables:

``SHUFFLENETV2_HOME``
    Cache directory (default ``~/.cache/shufflenetv2``); point it at a shared or pre-filled directory on
    machines without internet access.
``SHUFFLENETV2_PRETRAINED_BASE_URL``
    Replaces the directory part of the release URLs (the file names are kept), for mirrors and tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO

from .errors import DownloadError

__all__ = [
    "PRETRAINED_URLS",
    "cache_dir",
    "download",
    "fetch_pretrained",
    "hash_prefix_from_url",
]

_RELEASE_DIR = "https://download.mindspore.cn/toolkits/mindcv/shufflenet/shufflenetv2"

PRETRAINED_URLS: dict[str, str] = {
    "shufflenet_v2_x0_5": f"{_RELEASE_DIR}/shufflenet_v2_x0_5-8c841061.ckpt",
    "shufflenet_v2_x1_0": f"{_RELEASE_DIR}/shufflenet_v2_x1_0-0da4b7fa.ckpt",
    "shufflenet_v2_x1_5": f"{_RELEASE_DIR}/shufflenet_v2_x1_5-00b56131.ckpt",
    "shufflenet_v2_x2_0": f"{_RELEASE_DIR}/shufflenet_v2_x2_0-ed8e698d.ckpt",
}

HOME_ENV = "SHUFFLENETV2_HOME"
BASE_URL_ENV = "SHUFFLENETV2_PRETRAINED_BASE_URL"

_CHUNK = 1 << 16
# "-<hex>" right before the extension, or before a tag such as "-910v2" (MindCV's Ascend 910v2 weights)
_HASH_IN_NAME = re.compile(r"-([0-9a-fA-F]{8,64})(?=(?:-[^-./]+)*\.[^./]+$)")


def cache_dir() -> Path:
    """Where downloads live; an environment variable so offline machines can use a pre-filled directory."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    return Path("~/.cache/shufflenetv2").expanduser()


def _file_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not name:
        raise DownloadError(f"Cannot tell a file name from the URL {url!r}: it must end with a file name.")
    return name


def hash_prefix_from_url(url: str) -> str | None:
    """The SHA-256 prefix encoded in a release file name, so released files are checked without a manifest.

    Returns ``None`` when the name carries no such prefix (for example a user's own mirror with other
    names); the download is then not hash-checked.
    """
    name = Path(urllib.parse.urlsplit(url).path).name
    match = _HASH_IN_NAME.search(name)
    return match.group(1).lower() if match else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# the same remedy is spelt differently in Python and on the command line
_LOCAL_COPY = "checkpoint_path=FILE in create_model, --ckpt_path FILE in train.py and validate.py"


def _by_hand(url: str, dest: Path) -> str:
    return (
        f"If this machine is offline or cannot reach the server, download {url} by hand (for example on "
        f"another machine) and save it as {dest}; or set {HOME_ENV} to a directory that already holds "
        f"{dest.name}; or load a local copy of the weights instead ({_LOCAL_COPY})."
    )


class _Progress:
    """One self-overwriting stderr line; only for people watching a terminal, never for logs or pipes."""

    def __init__(self, name: str, total: int | None, enabled: bool) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        mib = done / 2**20
        if self.total:
            line = f"\r{self.name}: {mib:.1f}/{self.total / 2**20:.1f} MiB ({100 * done // self.total}%)"
        else:
            line = f"\r{self.name}: {mib:.1f} MiB"
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()


def _stream(url: str, dest: Path, out: BinaryIO, timeout: float, progress: bool) -> str:
    """Copy the response body into ``out`` and return its SHA-256; raises DownloadError on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "shufflenetv2-hub"})
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            bar = _Progress(dest.name, total, progress)
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                bar.update(done)
            bar.update(done, final=True)
    except urllib.error.HTTPError as exc:
        exc.close()
        detail = f"the server answered HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            detail = f"no answer within {timeout:g} s"
        else:
            detail = f"the server could not be reached: {reason}"
    except TimeoutError:
        detail = f"the transfer stalled for more than {timeout:g} s after {done} bytes"
    except http.client.IncompleteRead as exc:
        detail = f"the connection was dropped after {done + len(exc.partial)} bytes"
    except (http.client.HTTPException, OSError) as exc:
        detail = f"the transfer failed after {done} bytes: {exc.__class__.__name__}: {exc}"
    else:
        if total is not None and done != total:
            detail = f"the connection was dropped after {done} of {total} bytes"
        else:
            return digest.hexdigest()
    raise DownloadError(f"Could not download {url}: {detail}. {_by_hand(url, dest)}")


def download(
    url: str,
    dest: Path | None = None,
    expected_sha256_prefix: str | None = None,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` so that ``dest`` ends up either unchanged or complete and verified.

    ``dest`` defaults to the cache directory plus the URL's file name.  ``expected_sha256_prefix``
    defaults to the prefix in the file name (see :func:`hash_prefix_from_url`); pass ``""`` to skip the
    check.  An existing ``dest`` is reused when it passes the check (or when there is nothing to check
    against), and downloaded again, with a warning, when it does not.  ``timeout`` bounds each network
    wait, not the whole transfer.  ``progress=None`` shows progress only when stderr is a terminal.
    """
    dest = Path(dest) if dest is not None else cache_dir() / _file_name(url)
    expected = hash_prefix_from_url(url) if expected_sha256_prefix is None else expected_sha256_prefix
    expected = expected.strip().lower()
    if expected and not re.fullmatch(r"[0-9a-f]{1,64}", expected):
        raise ValueError(f"expected_sha256_prefix must be hexadecimal, got {expected_sha256_prefix!r}")
    if progress is None:
        progress = sys.stderr is not None and sys.stderr.isatty()

    if dest.is_file():
        if not expected:
            return dest
        actual = _sha256_file(dest)
        if actual.startswith(expected):
            return dest
        warnings.warn(
            f"{dest} has SHA-256 {actual}, not the expected prefix {expected} (a partial or corrupted "
            f"earlier download?); downloading it again from {url}.",
            stacklevel=2,
        )

    tmp_path: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False) as tmp:
            tmp_path = Path(tmp.name)
            actual = _stream(url, dest, tmp, timeout, progress)
            tmp.flush()
            os.fsync(tmp.fileno())
        if expected and not actual.startswith(expected):
            raise DownloadError(
                f"The file downloaded from {url} has SHA-256 {actual}, which does not start with the "
                f"expected {expected}, so it was removed. The transfer may have been altered (a proxy or "
                f"captive portal) or the file on the server changed; retry later, or download it by hand, "
                f"check its hash, and save it as {dest}."
            )
        # NamedTemporaryFile is private (0600); a cache file should be as readable as any other download
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dest)
    except BaseException as exc:  # KeyboardInterrupt mid-transfer must not leave a .part file either
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        if isinstance(exc, DownloadError) or not isinstance(exc, OSError):
            raise
        raise DownloadError(
            f"Could not write {dest} while downloading {url}: {exc}. Set {HOME_ENV} to a writable "
            f"directory, or download the file by hand and load it from where it lies ({_LOCAL_COPY})."
        ) from exc
    return dest


def fetch_pretrained(name: str) -> Path:
    """Path to the verified MindCV checkpoint for ``name``, downloading it into the cache the first time."""
    try:
        url = PRETRAINED_URLS[name]
    except KeyError:
        valid = ", ".join(sorted(PRETRAINED_URLS))
        raise DownloadError(f"No pretrained weights for model {name!r}; the ones available are: {valid}.") from None
    file_name = _file_name(url)
    base = os.environ.get(BASE_URL_ENV)
    if base:
        url = f"{base.rstrip('/')}/{file_name}"
    return download(url, cache_dir() / file_name, expected_sha256_prefix=hash_prefix_from_url(file_name))
