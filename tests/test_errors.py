"""The exception tree is the one source of an error's HTTP status and code."""

from __future__ import annotations

import service.backends  # noqa: F401 (its error classes join the tree)
from service.errors import ServiceError, status_of_type


def _tree() -> list[type[ServiceError]]:
    classes, pending = [], [ServiceError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


def test_each_error_code_names_one_class_and_gives_its_status() -> None:
    classes = _tree()
    assert len({cls.type for cls in classes}) == len(classes)
    for cls in classes:
        assert status_of_type(cls.type) == cls.status
    assert status_of_type("run_timeout") == 504
    assert status_of_type("cancelled") == 409
    assert status_of_type("no_such_code") is None
