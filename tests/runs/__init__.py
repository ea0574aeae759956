"""Runs under the supervisor: lifecycle, events, cancel, deadlines, the final write, shutdown of
the runs, other workers' runs."""
