"""LLM backends: the adapters and their protocols, auto, fleets, the interceptor, the queue,
timeouts, upstream statuses, stream parsers, the embedded llama.cpp server, the simulator, and
the service end to end on it."""
