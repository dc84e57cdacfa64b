"""Clients of cit-server: Python clients (synchronous and asyncio) and the `cit` CLI. No torch import."""
from .client import AsyncCitClient, CitClient, fell_back_reason, generate_request

__all__ = ["AsyncCitClient", "CitClient", "fell_back_reason", "generate_request"]
