"""Flower ClientApp: thin train/evaluate handlers; the work is in client.task and crosssim.federated."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client import task
from crosssim.config import ConfigError
from crosssim.data.sites import SiteError

# Error code of a reply in which the site refuses the message itself (bad labels, bad config): one line, no traceback.
SITE_REFUSED_CODE = 100
Handler = Callable[[RecordDict, Context, Mapping[str, Any]], RecordDict]


def reply(msg: Message, context: Context, handler: Handler, run_settings: Mapping[str, Any]) -> Message:
    """``handler``'s records as the reply; a data or config problem at this site becomes a one-line error reply."""
    try:
        return Message(content=handler(msg.content, context, run_settings), reply_to=msg)
    except (SiteError, ConfigError) as exc:
        print(f"crosssim client: refused {msg.metadata.message_type} message: {exc}", flush=True)
        return Message(Error(code=SITE_REFUSED_CODE, reason=str(exc)), reply_to=msg)


def build_client_app(settings: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``settings`` stand in for run-config values (``run_simulation`` passes none)."""
    app = ClientApp()

    def run_settings(context: Context) -> dict[str, Any]:
        return {**context.run_config, **(settings or {})}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return reply(msg, context, task.train, run_settings(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return reply(msg, context, task.evaluate, run_settings(context))

    return app


app = build_client_app()
