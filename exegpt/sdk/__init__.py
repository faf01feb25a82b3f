"""The exegpt client SDK: typed generate() and stream() over the router's gRPC API."""

from exegpt.sdk.client import AsyncClient, Client
from exegpt.sdk.types import Completion, CompletionChunk, ExegptError

__all__ = ["AsyncClient", "Client", "Completion", "CompletionChunk", "ExegptError"]
