"""DICOM on the node.

Parsing and import, the study store, de-identification and pseudonyms, the wire codec
and its cache, DIMSE (C-STORE, C-FIND, C-MOVE, C-GET) and the PACS. Imports
:mod:`node.core` and :mod:`crypto`; never the network layers above it.
"""
