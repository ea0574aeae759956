"""A protocol-true fake LLM server (Ollama and OpenAI-compatible/llama.cpp) for tests and benches.

    async with open_simulator() as sim:          # real loopback server on a free port
        sim.script("Hello!", Reply(tool_calls=({"name": "add", "arguments": {"a": 1}},)))
        ...                                      # point a backend at sim.url
        record = sim.streams[0]                  # what happened to the first chat request

``mock_transport(sim)`` serves the same scenarios in memory for virtual-time tests;
``python -m service.sim --port N`` runs it standalone.
"""

from __future__ import annotations

from .app import Simulator, StreamRecord
from .mock import mock_transport
from .scenario import Reply
from .server import open_simulator, serve

__all__ = ["Reply", "Simulator", "StreamRecord", "mock_transport", "open_simulator", "serve"]
