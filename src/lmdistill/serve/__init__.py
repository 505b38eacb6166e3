"""``lmdistill serve``: an OpenAI-compatible HTTP server for local models (the decoding is ``lmdistill.decoding``)."""

from lmdistill.serve.app import create_app
from lmdistill.serve.server import ServerThread, free_port

__all__ = ["ServerThread", "create_app", "free_port"]
