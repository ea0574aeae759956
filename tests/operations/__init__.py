"""Running the service: python -m service (start, signals, settings), shutdown and drain, workers,
instances sharing a database, wake-ups across them, the GC pacer."""
