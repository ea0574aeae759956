"""Streams to clients: SSE, the WebSocket, /v1 streaming, the event reader, keep-alive, re-joins."""
