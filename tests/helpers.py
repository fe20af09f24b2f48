"""Small assertions shared by several test files."""

from __future__ import annotations

from workbench.errors import ErrorCode


def assert_error(excinfo, code: ErrorCode, *words: str) -> None:
    """The raised error has ``code``, a one-line message containing every word (any case) and a hint."""
    err = excinfo.value
    assert err.code is code, err
    assert "\n" not in err.message and err.hint
    for word in words:
        assert word.lower() in err.message.lower(), (word, err.message)
