"""The ServerApp's grid: Flower's own, except that replies are pulled every ``reply-poll-s`` rather than every 3 s.

Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid.HttpGrid.send_and_receive``) sleeps 3 s between
pulls, so every message waits on average 1.5 s after its last reply reached the SuperLink; the same Flower's own
agent grid (``flwr.supercore.task_process.agent.grid``) polls every 0.25 s. Pushing and pulling stay Flower's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """``grid`` with its own wait for replies; everything else is handed to ``grid``."""

    def __init__(self, grid: Grid, poll_s: float) -> None:
        self.grid, self.poll_s = grid, poll_s

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
