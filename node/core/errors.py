"""Errors raised by :mod:`node`. Messages are for the person at the terminal."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error raised by the node package."""


class HomeError(NodeError):
    """The node home is missing, incomplete or unusable."""


class ConfigError(NodeError):
    """The node configuration file is invalid."""


class KeyFileError(NodeError):
    """The identity key file is missing, damaged, or cannot be unlocked."""
