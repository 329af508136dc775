"""radmesh consult: consultations between nodes.

- :mod:`consult.requests` — signed requests/responses, the state machine table,
  routing and first-accept-wins offers, turnaround statistics (pure).
- :mod:`consult.store` — the node's consult database (SQLite, survives restarts).
- :mod:`consult.shared` — live shared state (pycrdt): annotations, chat, report
  text; :class:`~consult.shared.LiveSession` speaks y-sync over an injected send.
- :mod:`consult.presence` — cursors, viewports, follow-the-presenter (Awareness).
- :mod:`consult.measure` — lengths, angles, ellipse ROI stats in HU (numpy).
- :mod:`consult.report` — signed reports and peer reviews, DICOM SR export.
"""
