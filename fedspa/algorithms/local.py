"""Local-only training: every client trains its own dense model on its own data, nothing is communicated — the
floor that personalized FL must beat (e.g. Ditto and FedSpa's tables list it as "Local")."""

from __future__ import annotations

from .fedavg import SplitFedAvg


class Local(SplitFedAvg):
    name = "local"

    def is_shared(self, name: str) -> bool:
        return False
