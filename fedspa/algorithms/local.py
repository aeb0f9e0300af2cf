"""Local-only training: every client trains its own dense model on its own data, nothing is communicated — the
floor that personalized FL must beat (e.g. Ditto and FedSpa's tables list it as "Local")."""

from __future__ import annotations

from .fedavg import FedAvgClient, FedAvgServer, SharedEntries
from .registry import register


class NothingShared(SharedEntries):
    def is_shared(self, name: str) -> bool:
        return False


class LocalServer(NothingShared, FedAvgServer):
    pass


class LocalClient(NothingShared, FedAvgClient):
    pass


register("local", server=LocalServer, client=LocalClient)
