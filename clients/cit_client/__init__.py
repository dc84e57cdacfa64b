"""Clients of cit-server: a synchronous Python client and the `cit` CLI. No torch import."""
from .client import CitClient

__all__ = ["CitClient"]
