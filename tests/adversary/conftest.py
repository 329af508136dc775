"""Fixtures the adversary tests share with the tests of what they attack."""

from tests.tui.test_remote_session import attachable  # noqa: F401 (a node serving the TUI)
