"""The running node.

:mod:`~node.app.runtime` (the node, with sealed delivery) builds its services:
:mod:`~node.app.consults` (requests and answers; :mod:`~node.app.studies` serves and
fetches the study, :mod:`~node.app.reports` files and sends reports, acknowledgements,
reviews and addenda; :mod:`~node.app.cases` is what they share), :mod:`~node.app.guests`,
:mod:`~node.app.alerts` and :mod:`~node.app.retention`. Local commands reach it through
:mod:`~node.app.control` and the operation table :mod:`~node.app.operations`
(:mod:`~node.app.commands` runs one on a node brought up for it). Sits on top of
:mod:`consult`, :mod:`peer_transport` and :mod:`registry`.
"""
