"""Flower ClientApp: thin train/evaluate handlers; the work is in client.task and crosssim.federated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import task


def build_client_app(settings: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``settings`` stand in for run-config values (``run_simulation`` passes none)."""
    app = ClientApp()

    def run_settings(context: Context) -> dict[str, Any]:
        return {**context.run_config, **(settings or {})}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content=task.train(msg.content, context, run_settings(context)), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(content=task.evaluate(msg.content, context, run_settings(context)), reply_to=msg)

    return app


app = build_client_app()
