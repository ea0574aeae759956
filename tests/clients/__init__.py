"""The clients that ship with the service: the chat page in a real browser, python -m service chat
in a terminal."""
