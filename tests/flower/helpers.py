"""An in-process Flower grid: the strategy's messages go straight to the ClientApp, one Context per node, so the
strategy/client logic is tested in milliseconds (the real processes are tested in test_flower_processes.py)."""

from __future__ import annotations

import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """Nodes 100 + k play partition k. ``silent`` nodes never reply; ``failing`` nodes reply with an error."""

    def __init__(self, clients: int, node_config: dict[int, dict] | None = None, silent: set[int] = frozenset(),
                 failing: set[int] = frozenset()) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                             node_config={"partition-id": k, "num-partitions": clients, **(node_config or {}).get(k, {})})
            for k in range(clients)}
        self.silent, self.failing = set(silent), set(failing)
        self.sent_bytes: list[int] = []

    def set_run(self, run) -> None:  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        return None

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self):  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        from fedspa.flower.client_app import app

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            message.metadata.__dict__["_src_node_id"] = 0
            if node - 100 in self.silent and message.metadata.message_type == "train":
                continue
            if node - 100 in self.failing and message.metadata.message_type == "train":
                reply = Message(Error(code=0, reason="ClientApp raised"), reply_to=message)
            else:
                reply = app(message, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies
