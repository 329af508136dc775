"""The running node.

The runtime, the consult service (serving, fetching, every consult message), sealed
delivery, alerts, live-session guests, retention and the control socket. Sits on top of
:mod:`consult`, :mod:`peer_transport` and :mod:`registry`.
"""
