"""Load test of the HTTP service: concurrent clients posting one photograph to /identify, on loopback.

    python benchmarks/app_load.py --gallery=gallery [--aligned] [--image=photo.jpg] [--clients=8]
        [--seconds=30] [--output=results/app_load.json]

Starts the service as its own process, as a user runs it
(`python -m sparse_embed.app serve --gallery=... --host=127.0.0.1 --port=0`,
read-only: no token), waits for the line with its address (its output is read
for the whole run: a service blocked writing its access log to a full pipe
answers nothing), then runs --clients client threads, each posting the image
to POST /identify over its own keep-alive connection, one request after
another, until --seconds are up. Prints one table: requests, errors, requests
per second, faces per answer, the clients' latency percentiles (ms, from
sending a request to reading its whole answer) and the server's own p50/p99
over the same requests (each answer's Server-Timing header: from the
request's arrival to its answer; the rest is the network and the client).
--output writes the table as a result file (`sparse_embed.results`). Traffic
stays on 127.0.0.1, and the run ends by itself: the clients stop after
--seconds, the server is stopped after them. One untimed request first builds
the model's graph.
The image defaults to scikit-image's astronaut photograph (512x512, one face).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_embed.cli import make_parser  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

HOST = "127.0.0.1"
# How long the server may take to load its model and print its address.
START_TIMEOUT_S = 300.0
# Lines of the service's output kept to show when it fails.
OUTPUT_TAIL_LINES = 40
COLUMNS = (Column("clients", "clients"), Column("seconds", "s"), Column("requests", "requests"),
           Column("errors", "errors"), Column("requests_per_s", "requests/s", ".2f"),
           Column("faces_per_answer", "faces/answer", ".2f"), Column("p50_ms", "p50 ms", ".1f"),
           Column("p90_ms", "p90 ms", ".1f"), Column("p99_ms", "p99 ms", ".1f"),
           Column("max_ms", "max ms", ".1f"),
           Column("server_p50_ms", "server p50 ms", ".1f"), Column("server_p99_ms", "server p99 ms", ".1f"))


def multipart(image: bytes, filename: str) -> tuple[bytes, str]:
    """(body, content type) of a multipart form with the file field `image`."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + image + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def serve_command(args: argparse.Namespace) -> list[str]:
    """The command that starts the service on a free port of 127.0.0.1, read-only."""
    command = [sys.executable, "-m", "sparse_embed.app", "serve", f"--gallery={args.gallery}",
               f"--host={HOST}", "--port=0"]
    command += [f"--model={args.model}"] if args.model else []
    command += [f"--mtcnn={args.mtcnn}"] if args.mtcnn else []
    return command + (["--aligned"] if args.aligned else [])


class Server:
    """A service started as its own process, its output drained as it comes.

    Both pipes are read by threads for the whole run: the service writes an
    access log line per request (uvicorn's, to stdout), and a pipe nobody
    reads fills after about a thousand of them (64 KiB), after which the
    service's event loop blocks in that write and answers nothing more.

    Args:
        command: The command that starts it; it prints its address
            (`http://127.0.0.1:PORT/`) once it listens.

    Raises:
        SystemExit: If the process exits, or prints no address for START_TIMEOUT_S (with the
            end of its output).
    """

    def __init__(self, command: Sequence[str]) -> None:
        env = {key: value for key, value in os.environ.items() if key != "SPARSE_EMBED_APP_TOKEN"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        # The last lines of each stream, kept apart: a shared tail would end
        # with whichever reader thread happened to append last.
        self.tails: dict[str, deque[str]] = {
            name: deque(maxlen=OUTPUT_TAIL_LINES) for name in ("stdout", "stderr")}
        self._port: queue.Queue[int] = queue.Queue()
        self._readers = [threading.Thread(target=self._drain, args=(stream, self.tails[name]), daemon=True)
                         for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for reader in self._readers:
            reader.start()
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                return self._port.get(timeout=1.0)
            except queue.Empty:
                continue
        self.stop()
        raise SystemExit("the service did not start:\n" + self.last_lines())

    def last_lines(self) -> str:
        """The last lines the service wrote, stdout's then stderr's."""
        return "".join(self.tails["stdout"]) + "".join(self.tails["stderr"])

    def _drain(self, stream: Any, tail: deque[str]) -> None:
        for line in stream:
            tail.append(line)
            match = re.search(rf"http://{re.escape(HOST)}:(\d+)/", line)
            if match:
                self._port.put(int(match[1]))

    def stop(self) -> None:
        """Stops the service (SIGTERM, then SIGKILL after 30 s) and reads the rest of its output."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self._readers:
            reader.join(30)


def client(port: int, body: bytes, content_type: str, until: float, latencies: list[float],
           served: list[float], faces: list[int], errors: list[str]) -> None:
    """Posts the body to /identify, one request after another, until `until` (time.monotonic).

    Appends each answered request's latency (s), the service's own time for it (ms, its
    Server-Timing header) and its face count; each failure's reason to `errors`.
    """
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    headers = {"Content-Type": content_type}
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            connection.request("POST", "/identify", body, headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as e:
            errors.append(type(e).__name__)
            connection.close()
            connection = http.client.HTTPConnection(HOST, port, timeout=120)
            continue
        if response.status != 200:
            errors.append(str(response.status))
            continue
        latencies.append(time.perf_counter() - start)
        served.append(float(response.getheader("server-timing", "").partition(";dur=")[2] or "nan"))
        faces.append(len(json.loads(answer)["faces"]))
    connection.close()


def server_stats(port: int) -> dict:
    """The service's GET /stats."""
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", "/stats")
    return json.loads(connection.getresponse().read())


def load_image(path: str | None) -> tuple[bytes, str]:
    """(file bytes, file name) of --image, or of the astronaut photograph as PNG."""
    if path:
        return Path(path).read_bytes(), Path(path).name
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue(), "astronaut.png"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/app_load.py`."""
    parser = make_parser(__doc__, "python benchmarks/app_load.py")
    parser.add_argument("--gallery", required=True, help="The gallery to serve.")
    parser.add_argument("--model", default=None,
                        help="Run directory or .tflite model; default: the gallery's.")
    parser.add_argument("--mtcnn", default=None, help="TFLite MTCNN directory (as serve's --mtcnn).")
    parser.add_argument("--aligned", action="store_true", help="Serve aligned crops: no detection.")
    parser.add_argument("--image", default=None, help="The image posted; default: the astronaut photograph.")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients (default: %(default)s).")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="Length of the run (default: %(default)s).")
    parser.add_argument("--output", default=None, help="Also write the table to this result file.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Starts the service, runs the clients, prints the table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.clients < 1 or not args.seconds > 0:
        build_parser().error("--clients must be >= 1 and --seconds > 0")
    image, filename = load_image(args.image)
    body, content_type = multipart(image, filename)
    server = Server(serve_command(args))
    try:
        # One untimed request first: the model's first call builds its graph.
        client(server.port, body, content_type, time.monotonic() + 1e-9, [], [], [], [])
        latencies, served, faces, errors = [], [], [], []
        until = time.monotonic() + args.seconds
        work = (server.port, body, content_type, until, latencies, served, faces, errors)
        threads = [threading.Thread(target=client, args=work) for _ in range(args.clients)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - start
        stats = server_stats(server.port)
    finally:
        server.stop()
    if not latencies:
        raise SystemExit(f"no request succeeded ({len(errors)} errors: {sorted(set(errors))}); the "
                         "service's last lines:\n" + server.last_lines())
    ms = np.asarray(latencies) * 1e3
    served_ms = np.asarray(served)
    row = {"clients": args.clients, "seconds": round(wall, 1), "requests": len(latencies),
           "errors": len(errors),
           "requests_per_s": len(latencies) / wall, "faces_per_answer": float(np.mean(faces)),
           "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
           "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
           "server_p50_ms": float(np.percentile(served_ms, 50)),
           "server_p99_ms": float(np.percentile(served_ms, 99))}
    header = [c.label for c in COLUMNS]
    cells = [format(row[c.key], c.format) if c.format else str(row[c.key]) for c in COLUMNS]
    widths = [max(len(h), len(v)) for h, v in zip(header, cells, strict=True)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join(v.rjust(w) for v, w in zip(cells, widths, strict=True)))
    gallery, model = stats["gallery"], stats["model"]
    setup = (f"{gallery['people']} people, {gallery['embeddings']} embeddings, "
             f"{stats['index']['type']} index, "
             f"model {model['width']}x{model['height']} input, {model['embedding_size']}-d embeddings "
             f"(flip {model['flip']}), {'aligned crops' if args.aligned else 'MTCNN detection'}, "
             f"image {filename} ({len(image)} bytes)")
    print(setup)
    if args.output:
        write_result(args.output, "HTTP service under load: POST /identify from concurrent clients, loopback",
                     {"load": (COLUMNS, [row])}, notes=f"{setup}; server and clients on one machine")

if __name__ == "__main__":
    main()
