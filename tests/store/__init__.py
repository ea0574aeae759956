"""The stores (SQLite and PostgreSQL): their semantics on both, PostgreSQL's own faults, a full
volume, kill -9 under load, the committer that writes runs to them."""
