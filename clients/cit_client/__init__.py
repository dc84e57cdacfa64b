"""Clients of cit-server: a synchronous Python client and the `cit` CLI. No torch import."""
from .client import CitClient, fell_back_reason

__all__ = ["CitClient", "fell_back_reason"]
