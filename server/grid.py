"""The ServerApp's grid: Flower's own, except that replies are pulled every ``reply-poll-s`` rather than every 3 s,
and a reply's objects not uploaded yet are asked for again after ``reply-poll-s`` rather than after 1 s.

Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid.HttpGrid.send_and_receive``) sleeps 3 s between
pulls, so every message waits on average 1.5 s after its last reply reached the SuperLink; the same Flower's own
agent grid (``flwr.supercore.task_process.agent.grid``) polls every 0.25 s. Polled that often, a reply is often
found while its SuperNode is still uploading the reply's objects (the message comes first); Flower's
``pull_objects`` then retries each missing object after ``PULL_INITIAL_BACKOFF`` (1 s), doubling: most rounds
would pay that second. Pushing and pulling stay Flower's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import http_grid
from flwr.supercore.constant import PULL_INITIAL_BACKOFF
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.run import Run


def retry_object_pulls_after(backoff_s: float) -> None:
    """The deployment grid's first retry of a reply object not uploaded yet after ``backoff_s`` (Flower's doubling,
    cap and limits stay). Flower 1.42 offers no setting for it: its module's ``pull_objects`` is bound anew."""
    http_grid.pull_objects = functools.partial(inflatable_utils.pull_objects, initial_backoff=backoff_s)


class PollingGrid(Grid):
    """``grid`` with its own wait for replies; everything else is handed to ``grid``."""

    def __init__(self, grid: Grid, poll_s: float) -> None:
        self.grid, self.poll_s = grid, poll_s
        retry_object_pulls_after(min(poll_s, PULL_INITIAL_BACKOFF))

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull every ``poll_s`` until each has its reply or ``timeout`` s have passed."""
        pending = set(self.push_messages(list(messages)))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies.extend(pulled)
            pending -= {msg.metadata.reply_to_message_id for msg in pulled}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies
