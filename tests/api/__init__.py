"""The HTTP API: conversations, the error model, bad input, the contract (API.md, OpenAPI),
security, origins and tokens."""
