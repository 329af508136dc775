"""Foundations every part of a node shares.

Configuration and the home directory, keys, the audit log, the package's errors, and the
small helpers: private files, the display sanitiser, ids, supervised tasks, replay records.
Imports only :mod:`crypto`.
"""
