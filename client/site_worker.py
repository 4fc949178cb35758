"""The hospital's resident site worker: one process per ``crosssim client`` that keeps torch and crosssim imported.

Flower 1.42 starts a fresh ClientApp process for every message, and importing torch and crosssim in it costs more
than a small model's round of training (docs/FLOWER-OVERHEAD.md). ``crosssim client`` therefore starts this worker
beside its SuperNode and names its socket in ``CROSSSIM_SITE_WORKER``; the ClientApp process then only forwards the
message's records and its context to the worker over that Unix socket (a private folder on the hospital's own
machine) and returns what the worker's handler made: the same ``client.task`` handler, the same records. Without a
reachable worker the ClientApp runs the handler itself.

Wire: a request is three frames (a JSON header with the handler's name and run settings, the Context and the
message's RecordDict, both as Flower's protobuf); a reply is a JSON header with the status, then the reply's
RecordDict and the context's state. Each frame is an 8-byte big-endian length and its bytes.

    python -m client.site_worker --socket PATH
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

WORKER_SOCKET_ENV = "CROSSSIM_SITE_WORKER"  # set by `crosssim client` for its SuperNode and so its ClientApps
FRAME_LENGTH = struct.Struct(">Q")
REQUEST_FRAMES, REPLY_FRAMES = 3, 3
OK, REFUSED, FAILED = "ok", "refused", "failed"
READY_LINE = "site worker ready"
LISTEN_POLL_S = 0.1


class SiteRefused(Exception):
    """The site refuses the message itself (bad labels, bad config): one line, no traceback."""


class WorkerUnavailable(OSError):
    """No worker answers on the socket (not started, or gone)."""


def run_handler(kind: str, content: RecordDict, context: Context, run_settings: Mapping[str, Any]) -> RecordDict:
    """``client.task``'s handler of ``kind`` (train | evaluate), in this process; a site problem → SiteRefused."""
    from client import task
    from crosssim.config import ConfigError
    from crosssim.data.sites import SiteError

    try:
        return task.HANDLERS[kind](content, context, run_settings)
    except (SiteError, ConfigError) as exc:
        raise SiteRefused(str(exc)) from exc


# ---------------------------------------------------------------- frames


def send_frames(sock: socket.socket, frames: Sequence[bytes]) -> None:
    sock.sendall(b"".join(FRAME_LENGTH.pack(len(frame)) + frame for frame in frames))


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the connection closed {left} byte(s) before the end of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive_frames(sock: socket.socket, count: int) -> list[bytes]:
    return [_read_exactly(sock, FRAME_LENGTH.unpack(_read_exactly(sock, FRAME_LENGTH.size))[0]) for _ in range(count)]


def _recorddict_bytes(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def _recorddict(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# ---------------------------------------------------------------- the ClientApp's side


def call(socket_path: str, kind: str, content: RecordDict, context: Context,
         run_settings: Mapping[str, Any]) -> RecordDict:
    """The worker's reply records to one message; ``context.state`` takes the worker's state after it.

    Raises WorkerUnavailable when no worker answers on ``socket_path``, SiteRefused when the site refuses the message,
    RuntimeError (with the worker's traceback) when the handler failed there.
    """
    header = json.dumps({"kind": kind, "run_settings": dict(run_settings)}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(socket_path)
            send_frames(sock, [header, context_to_proto(context).SerializeToString(), _recorddict_bytes(content)])
            status, records, state = receive_frames(sock, REPLY_FRAMES)
    except OSError as exc:  # nothing listens, or the worker went away mid-message (its state is unchanged)
        raise WorkerUnavailable(f"no answer from the site worker on {socket_path}: {exc}") from exc
    outcome = json.loads(status)
    if outcome["status"] == REFUSED:
        raise SiteRefused(outcome["reason"])
    if outcome["status"] != OK:
        raise RuntimeError(f"the site worker's {kind} handler failed:\n{outcome['reason']}")
    context.state = _recorddict(state)
    return _recorddict(records)


def wait_until_listening(process: subprocess.Popen, socket_path: Path, timeout_s: float) -> str | None:
    """None once the worker ``process`` has bound ``socket_path``; else why it did not (it exited, or timed out)."""
    deadline = time.monotonic() + timeout_s
    while not socket_path.exists():
        if process.poll() is not None:
            return f"exited with code {process.returncode}"
        if time.monotonic() > deadline:
            return f"did not listen within {timeout_s:.0f} s"
        time.sleep(LISTEN_POLL_S)
    return None


# ---------------------------------------------------------------- the worker's side


def answer(sock: socket.socket) -> None:
    """Read one request from ``sock``, run its handler, send the reply (a failure is a reply, never a crash)."""
    header, context_bytes, content_bytes = receive_frames(sock, REQUEST_FRAMES)
    request = json.loads(header)
    proto = ProtoContext()
    proto.ParseFromString(context_bytes)
    context = context_from_proto(proto)
    records, status = RecordDict(), {"status": OK}
    try:
        records = run_handler(request["kind"], _recorddict(content_bytes), context, request["run_settings"])
    except SiteRefused as exc:
        status = {"status": REFUSED, "reason": str(exc)}
    except Exception:  # the worker serves the next message: the ClientApp raises this one
        status = {"status": FAILED, "reason": traceback.format_exc()}
    send_frames(sock, [json.dumps(status).encode(), _recorddict_bytes(records), _recorddict_bytes(context.state)])


def serve(socket_path: str | Path) -> None:
    """Answer requests on ``socket_path`` one at a time, until the process is stopped."""
    import client.task  # noqa: F401 (imported once, before the first message: what this process is for)

    path = Path(socket_path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)  # this hospital's own user only
    listener.listen()
    print(f"{READY_LINE} (pid {os.getpid()}, {path})", flush=True)
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                answer(connection)
            except (OSError, ValueError) as exc:  # a broken or malformed request: that ClientApp falls back
                print(f"site worker: dropped a request: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (a private folder)")
    serve(parser.parse_args(argv).socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
