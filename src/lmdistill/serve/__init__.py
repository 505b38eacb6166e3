"""``lmdistill serve``: an OpenAI-compatible server for local models."""

from lmdistill.serve.app import create_app
from lmdistill.serve.engine import ChatEngine, Completion, ContextLengthError
from lmdistill.serve.server import ServerThread, free_port

__all__ = ["ChatEngine", "Completion", "ContextLengthError", "ServerThread", "create_app", "free_port"]
