"""Flower ClientApp: thin train/evaluate handlers; the work is in client.task and crosssim.federated.

In a deployment ``crosssim client`` runs a resident site worker (``client.site_worker``) and names its socket in
``CROSSSIM_SITE_WORKER``: this process, started afresh by Flower for every message, then forwards the records to it
and never imports torch. Without a worker (simulation, a bare ``flower-supernode``, a worker that went away) the
handler runs here.
"""

from __future__ import annotations

import time

IMPORTS_STARTED_AT = time.time()  # before the imports below, which a deployment pays again for every message

import os  # noqa: E402 (the imports are timed)
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.site_worker import WORKER_SOCKET_ENV, SiteRefused, WorkerUnavailable, call, run_handler  # noqa: E402
from crosssim.boundary import (HANDLER_STARTED, IMPORTS_DONE, IMPORTS_STARTED, PROCESS_STARTED,  # noqa: E402
                               REPLY_PACKED, TIMINGS_RECORD)

# Error code of a reply in which the site refuses the message itself (bad labels, bad config): one line, no traceback.
SITE_REFUSED_CODE = 100
PROC_STAT_START_FIELD = 19  # /proc/PID/stat field 22 (starttime, clock ticks after boot), counted after the ")"


def process_started_at() -> float:
    """Wall-clock start of this process from /proc (Linux, 10 ms ticks); where unreadable, the import's start."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[PROC_STAT_START_FIELD])
    except (OSError, IndexError, ValueError):
        return IMPORTS_STARTED_AT
    age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age_s


PROCESS_STARTED_AT = process_started_at()
IMPORTS_DONE_AT = time.time()


def handle(kind: str, content: RecordDict, context: Context,
           run_settings: Mapping[str, Any]) -> tuple[RecordDict, float]:
    """The records of handler ``kind``: from the site worker when one is named, else computed in this process; and
    the instant this process had imported what it needed (computing here first imports torch and crosssim)."""
    socket_path = os.environ.get(WORKER_SOCKET_ENV)
    if socket_path:
        try:
            return call(socket_path, kind, content, context, run_settings), IMPORTS_DONE_AT
        except WorkerUnavailable as exc:
            print(f"crosssim client: {exc}; computing this {kind} message in the ClientApp process", flush=True)
    import client.task  # noqa: F401 (timed: the imports a message without a site worker pays)

    imported = time.time()
    return run_handler(kind, content, context, run_settings), imported


def reply(msg: Message, context: Context, kind: str, run_settings: Mapping[str, Any]) -> Message:
    """Handler ``kind``'s records as the reply; a data or config problem at this site becomes a one-line error reply.

    The reply's timings record gets this process's instants (start, imports, handler call, reply packed).
    """
    handler_started = time.time()
    try:
        content, imports_done = handle(kind, msg.content, context, run_settings)
    except SiteRefused as exc:
        print(f"crosssim client: refused {msg.metadata.message_type} message: {exc}", flush=True)
        return Message(Error(code=SITE_REFUSED_CODE, reason=str(exc)), reply_to=msg)
    content[TIMINGS_RECORD] = MetricRecord({
        PROCESS_STARTED: PROCESS_STARTED_AT, IMPORTS_STARTED: IMPORTS_STARTED_AT, IMPORTS_DONE: imports_done,
        HANDLER_STARTED: max(handler_started, imports_done), **content.get(TIMINGS_RECORD, {}),
        REPLY_PACKED: time.time()})
    return Message(content=content, reply_to=msg)


def build_client_app(settings: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``settings`` stand in for run-config values (``run_simulation`` passes none)."""
    app = ClientApp()

    def run_settings(context: Context) -> dict[str, Any]:
        return {**context.run_config, **(settings or {})}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return reply(msg, context, "train", run_settings(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return reply(msg, context, "evaluate", run_settings(context))

    return app


app = build_client_app()
