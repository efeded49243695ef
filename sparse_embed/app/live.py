"""What the HTTP service keeps between requests: the current gallery, its statistics, and upload checks.

The web framework lives in `sparse_embed.app.serve`; this module has none of
it, so its parts are plain Python:

- `LiveGallery`: the gallery a service answers from. Readers take a reference
  to the current `Snapshot` and read only it; a writer (serialised by a lock)
  loads a private copy of the gallery, changes it, saves it as a new state
  (`Gallery.save`: a new state directory, then the `gallery.json` rename) and
  only then publishes it. A reader therefore sees the gallery before a change
  or after it, never half of one, and a failed change publishes nothing. A
  change made by another process (the CLI, or another service) is picked up
  by the next request, so several processes can serve one gallery directory.
- `SerialEmbedder`, `SerialDetector`: the model and MTCNN behind one lock,
  since a TFLite interpreter must not run in two threads at once.
- `RequestStats`: request counts, latency percentiles, face counts, and their
  Prometheus text exposition.
- `decode_upload`: an uploaded file to RGB pixels, refusing a file that is not
  an image, and a decompression bomb before it is decoded.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import threading
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sparse_embed.app.embedder import Detector, Embedder
from sparse_embed.app.gallery import POINTER_NAME, Gallery
from sparse_embed.errors import ConfigError, DataError, SparseEmbedError

T = TypeVar("T")
# Latencies kept per endpoint for the percentiles of /stats (the most recent ones).
RECENT_LATENCIES = 10000
# Upper bounds (seconds) of the request latency histogram of /metrics.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PERCENTILES = (50, 90, 99)
METRIC_PREFIX = "sparse_embed_app"
# The size statistics of a MutableIndex that /stats shows (the rest describe the last search).
INDEX_SIZE_KEYS = ("rows", "dim", "base_rows", "delta_rows", "tombstones", "nnz", "bytes", "value_type")
TOKEN_ENV = "SPARSE_EMBED_APP_TOKEN"


class RequestError(SparseEmbedError):
    """A request the service refuses: an HTTP status and one message for the client.

    Args:
        status: The HTTP status code (4xx, or 500 when the gallery cannot be written).
        message: What is wrong, and the fix where there is one.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One state of the gallery, as readers see it; never changed once published.

    Attributes:
        gallery: The gallery loaded from that state.
        state: The name of its state directory.
        stamp: (inode, modification time ns, size) of `gallery.json` when it was read:
            another process's change shows as a different stamp.
    """

    gallery: Gallery
    state: str
    stamp: tuple[int, int, int]


def _stamp(pointer: Path) -> tuple[int, int, int]:
    info = os.stat(pointer)
    return info.st_ino, info.st_mtime_ns, info.st_size


class LiveGallery:
    """The gallery a service answers from: immutable snapshots for readers, one writer at a time.

    Args:
        directory: The gallery directory.
        fingerprint: The fingerprint of the service's model.
        model: The service's model (run directory or `.tflite`), for messages.

    Raises:
        DataError: If the directory holds no readable gallery.
        ConfigError: If the gallery was made with another model.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, model: str) -> None:
        self.directory = Path(directory)
        self._fingerprint = fingerprint
        self._model = model
        self._lock = threading.Lock()
        self._snapshot = self._read()

    def _read(self) -> Snapshot:
        """The gallery's current state from disk, checked against the service's model."""
        pointer = self.directory / POINTER_NAME
        # The stamp first: a change between the two reads only makes the next request reload.
        stamp = _stamp(pointer) if pointer.is_file() else (0, 0, 0)
        gallery = Gallery.load(self.directory)
        gallery.check_model(self._fingerprint, self._model)
        state = json.loads(pointer.read_text())["state"]
        return Snapshot(gallery, state, stamp)

    def current(self) -> Snapshot:
        """The snapshot to answer a request from (reloaded first if another process changed the gallery).

        Never waits for a writer: while one holds the lock, the snapshot before
        its change is the current one.
        """
        snapshot = self._snapshot
        try:
            changed = _stamp(self.directory / POINTER_NAME) != snapshot.stamp
        except OSError:
            changed = False
        if changed and self._lock.acquire(blocking=False):
            try:
                if _stamp(self.directory / POINTER_NAME) != self._snapshot.stamp:
                    self._snapshot = self._read()
            finally:
                self._lock.release()
        return self._snapshot

    def change(self, edit: Callable[[Gallery], T]) -> T:
        """Applies `edit` to a private copy of the gallery, saves it as a new state and publishes it.

        Writers run one at a time. If `edit` or the save fails, nothing is
        published and the gallery on disk is the previous one.

        Args:
            edit: Changes the gallery it is given (in memory) and returns what the caller needs.

        Returns:
            What `edit` returned.

        Raises:
            RequestError: 500 when the new state cannot be written.
        """
        with self._lock:
            # A private copy from disk: the published snapshot is never modified, so readers
            # that hold it keep a consistent gallery, and a failed edit leaves no trace.
            gallery = Gallery.load(self.directory)
            gallery.check_model(self._fingerprint, self._model)
            result = edit(gallery)
            try:
                gallery.save()
            except OSError as e:
                raise RequestError(500, f"the gallery could not be written ({e}); it is unchanged") from None
            self._snapshot = self._read()
        return result


class SerialEmbedder:
    """An embedder whose `embed` and `confidence` run in one thread at a time (see `SerialDetector`).

    Args:
        embedder: The embedder.
        lock: The lock it shares with the detector.
    """

    def __init__(self, embedder: Embedder, lock: threading.Lock) -> None:
        self._embedder = embedder
        self._lock = lock
        self.model = embedder.model
        self.width, self.height = embedder.width, embedder.height
        self.embedding_size = embedder.embedding_size
        self.flip = embedder.flip
        self.sparse = embedder.sparse
        self.fingerprint = embedder.fingerprint
        self.has_confidence = embedder.has_confidence

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.embed`."""
        with self._lock:
            return self._embedder.embed(crops)

    def confidence(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.confidence`."""
        with self._lock:
            return self._embedder.confidence(crops)


class SerialDetector:
    """A detector whose `detect` runs in one thread at a time.

    A LiteRT interpreter (the `.tflite` model, the TFLite MTCNN) is not safe
    to call from two threads, and a TensorFlow model already uses every core
    within one call: one lock around both costs no throughput.

    Args:
        detector: The detector.
        lock: The lock it shares with the embedder.
    """

    def __init__(self, detector: Detector, lock: threading.Lock) -> None:
        self._detector = detector
        self._lock = lock

    def detect(self, image: np.ndarray) -> list:
        """See `Detector.detect`."""
        with self._lock:
            return self._detector.detect(image)


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded image file as uint8 [H, W, 3] RGB.

    The dimensions are read from the file's header (PIL, without decoding the
    pixels) and checked before anything is decoded, so a small file that
    would decode to a huge bitmap (a decompression bomb) costs nothing. The
    pixels are then decoded by OpenCV, as `identify` decodes image files, so
    the service and the command line give the same numbers for one file.

    Args:
        data: The file's bytes.
        max_pixels: The most pixels (width x height) accepted.

    Raises:
        RequestError: 415 for a file that is not an image (or does not decode), 413 for one
            larger than `max_pixels`.
    """
    import cv2
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(415, "the upload is empty: send an image file (JPEG, PNG, ...)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit refuses) on large images: the check
            # below, against the service's own limit, is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image is larger than the limit of {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(415, "the upload is not an image (JPEG, PNG, BMP, WebP, TIFF, ...)") from None
    if width * height > max_pixels:
        raise RequestError(413, f"the image is {width}x{height} = {width * height} pixels, more than the "
                                f"limit of {max_pixels}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    # OpenCV turns a photograph by its EXIF orientation, so only the pixel count is the header's.
    if image is None or image.shape[0] * image.shape[1] != width * height:
        raise RequestError(415, "the upload is not a decodable image (truncated or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def index_stats(gallery: Gallery) -> dict[str, Any]:
    """The size statistics of a gallery's index: type, rows, dimension, and for a sparse one its
    non-zeros, bytes and segments.

    Args:
        gallery: The gallery.
    """
    index = gallery.index
    out: dict[str, Any] = {"type": gallery.model.index_type, "rows": len(index), "dim": index.dim}
    stats = getattr(index, "stats", None)
    if isinstance(stats, dict):
        out.update({key: stats[key] for key in INDEX_SIZE_KEYS if key in stats})
        out["nnz_per_row"] = round(stats["nnz"] / stats["rows"], 3) if stats.get("rows") else None
    return out


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class RequestStats:
    """Requests by endpoint and status, their latencies, and faces identified and enrolled.

    Thread-safe. An endpoint is a method and a route template
    (`POST /people/{name}/faces`), so the labels stay few.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._counts: dict[tuple[str, str, int], int] = defaultdict(int)
        self._recent: dict[tuple[str, str], deque[float]] = defaultdict(
            lambda: deque(maxlen=RECENT_LATENCIES))
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._totals: dict[tuple[str, str], int] = defaultdict(int)
        self._faces: dict[str, int] = {"named": 0, "unknown": 0, "enrolled": 0}

    def record(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """Counts one answered request.

        Args:
            method: The HTTP method.
            endpoint: The route template, or `unmatched`.
            status: The status code sent.
            seconds: The time from the request's arrival to the end of the response.
        """
        key = (method, endpoint)
        with self._lock:
            self._counts[(method, endpoint, int(status))] += 1
            self._recent[key].append(seconds)
            buckets = self._buckets.setdefault(key, [0] * len(LATENCY_BUCKETS_S))
            for i, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    buckets[i] += 1
            self._sums[key] += seconds
            self._totals[key] += 1

    def count_faces(self, kind: str, n: int = 1) -> None:
        """Adds `n` faces of `kind` (`named`, `unknown` or `enrolled`)."""
        with self._lock:
            self._faces[kind] += n

    @property
    def uptime_s(self) -> float:
        """Seconds since the statistics started."""
        return time.monotonic() - self._started

    def summary(self) -> dict[str, Any]:
        """Requests by endpoint and status, latency percentiles (ms) by endpoint, and face counts."""
        with self._lock:
            requests: dict[str, dict[str, int]] = defaultdict(dict)
            for (method, endpoint, status), n in sorted(self._counts.items()):
                requests[f"{method} {endpoint}"][str(status)] = n
            latency = {}
            for (method, endpoint), recent in sorted(self._recent.items()):
                values = np.asarray(recent) * 1e3
                latency[f"{method} {endpoint}"] = {
                    "count": self._totals[(method, endpoint)], "recent": len(values),
                    **{f"p{p}": round(float(np.percentile(values, p)), 3) for p in PERCENTILES},
                    "max": round(float(values.max()), 3)}
            faces = dict(self._faces)
        return {"requests": dict(requests), "latency_ms": latency, "faces": faces,
                "uptime_s": round(self.uptime_s, 3)}

    def prometheus(self, gauges: Iterable[tuple[str, str, float]]) -> str:
        """The statistics in the Prometheus text exposition format (version 0.0.4).

        Args:
            gauges: (name without the prefix, help text, value) of the gallery's gauges.
        """
        p = METRIC_PREFIX
        duration = f"{p}_request_duration_seconds"
        lines = [f"# HELP {p}_requests_total Requests answered, by method, endpoint and status code.",
                 f"# TYPE {p}_requests_total counter"]
        with self._lock:
            for (method, endpoint, status), n in sorted(self._counts.items()):
                labels = _labels(method=method, endpoint=endpoint, status=str(status))
                lines.append(f"{p}_requests_total{labels} {n}")
            lines += [f"# HELP {duration} Time to answer a request, by method and endpoint.",
                      f"# TYPE {duration} histogram"]
            for key, buckets in sorted(self._buckets.items()):
                method, endpoint = key
                cumulative = zip((*LATENCY_BUCKETS_S, math.inf), (*buckets, self._totals[key]), strict=True)
                for bound, n in cumulative:
                    bucket = _labels(method=method, endpoint=endpoint, le=_number(bound))
                    lines.append(f"{duration}_bucket{bucket} {n}")
                labels = _labels(method=method, endpoint=endpoint)
                lines += [f"{duration}_sum{labels} {self._sums[key]!r}",
                          f"{duration}_count{labels} {self._totals[key]}"]
            lines += [f"# HELP {p}_faces_total Faces identified (named or unknown) and enrolled.",
                      f"# TYPE {p}_faces_total counter"]
            lines += [f"{p}_faces_total{_labels(result=kind)} {n}" for kind, n in sorted(self._faces.items())]
        for name, help_text, value in gauges:
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge",
                      f"{p}_{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def read_token(token_file: str | os.PathLike | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token writes need: the first line of `token_file`, else $SPARSE_EMBED_APP_TOKEN.

    Args:
        token_file: A file holding the token (surrounding whitespace ignored), or None.
        environ: The environment to read TOKEN_ENV from.

    Returns:
        The token, or None when neither gives one (the service is then read-only).

    Raises:
        DataError: If `token_file` cannot be read.
        ConfigError: If the file or the variable is empty, or the token has inner whitespace.
    """
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a text file"
            raise DataError(f"--token_file {path} cannot be read ({reason})") from None
        source = f"--token_file {path}"
    elif TOKEN_ENV in environ:
        token, source = environ[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if not token:
        raise ConfigError(f"{source} is empty: it must hold the token")
    if any(c.isspace() for c in token):
        raise ConfigError(f"{source} holds whitespace inside the token: one token, on one line")
    return token


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening, for the server to take.

    Binding here, before the model loads, turns an address in use into one line.

    Args:
        host: The address to bind (IPv4, IPv6 or a name).
        port: The port; 0 picks a free one.

    Raises:
        ConfigError: If the port is out of range.
        DataError: If the address cannot be bound.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must lie in [0, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise DataError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise DataError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock
