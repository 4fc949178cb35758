"""server.grid.PollingGrid: replies pulled every reply-poll-s until each message has one or the timeout passes."""

import time

from flwr.app import DEFAULT_TTL, Message, MessageType, Metadata, RecordDict
from flwr.superlink.grid import http_grid
from flwr.supercore.constant import PULL_INITIAL_BACKOFF

from server.grid import PollingGrid


def _message(message_id: str, reply_to: str = "") -> Message:
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=1, reply_to_message_id=reply_to,
                        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    return Message(content=RecordDict(), metadata=metadata)


class SlowLink:
    """A grid whose reply to message ``m-i`` appears at the ``i``-th pull; records every pull."""

    def __init__(self, never: set[str] = frozenset()) -> None:
        self.pulls: list[set[str]] = []
        self.never = never

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        asked = set(message_ids)
        self.pulls.append(asked)
        return [_message(f"r-{m}", reply_to=m) for m in sorted(asked - self.never)
                if int(m.removeprefix("m-")) <= len(self.pulls)]


def test_replies_are_pulled_until_every_message_has_one_and_only_pending_ones_are_asked_again():
    link = SlowLink()
    replies = PollingGrid(link, poll_s=0.01).send_and_receive([_message("m-1"), _message("m-2"), _message("m-3")])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m-1", "m-2", "m-3"]
    assert link.pulls == [{"m-1", "m-2", "m-3"}, {"m-2", "m-3"}, {"m-3"}]


def test_a_message_without_reply_is_given_up_at_the_timeout():
    link = SlowLink(never={"m-2"})
    started = time.monotonic()
    replies = PollingGrid(link, poll_s=0.01).send_and_receive([_message("m-1"), _message("m-2")], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m-1"]
    assert 0.2 <= time.monotonic() - started < 5.0 and all(pull >= {"m-2"} for pull in link.pulls)


def test_a_reply_object_not_uploaded_yet_is_asked_for_again_after_the_poll_not_after_flowers_second():
    PollingGrid(SlowLink(), poll_s=0.25)
    assert http_grid.pull_objects.keywords["initial_backoff"] == 0.25
    PollingGrid(SlowLink(), poll_s=3.0)  # never slower than Flower's own first retry
    assert http_grid.pull_objects.keywords["initial_backoff"] == PULL_INITIAL_BACKOFF
