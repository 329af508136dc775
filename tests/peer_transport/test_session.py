"""The session tables and bulk credit, without any link (pure, no event loop)."""

from __future__ import annotations

import pytest

from peer_transport.errors import LocalProtocolError, RemoteProtocolError
from peer_transport.session import (
    CONN_TERMINAL,
    CONNECTION,
    LINK,
    LINK_TERMINAL,
    BulkCredit,
    ConnEvent,
    ConnState,
    LinkEvent,
    LinkState,
)


def _walk_link(*events: LinkEvent) -> LinkState:
    state = LinkState.CONNECTING
    for event in events:
        state = LINK.fire(state, event)
    return state


def _walk_conn(*events: ConnEvent) -> ConnState:
    state = ConnState.CONNECTING
    for event in events:
        state = CONNECTION.fire(state, event)
    return state


def test_a_link_opens_only_after_its_handshake_and_fails_from_anywhere() -> None:
    assert _walk_link(LinkEvent.UP) is LinkState.HANDSHAKING
    assert _walk_link(LinkEvent.UP, LinkEvent.KEYED) is LinkState.OPEN
    for before in ([], [LinkEvent.UP], [LinkEvent.UP, LinkEvent.KEYED]):
        assert _walk_link(*before, LinkEvent.FAIL) is LinkState.DOWN


def test_keys_before_the_link_is_up_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="connecting cannot take: the handshake"):
        _walk_link(LinkEvent.KEYED)


def test_a_down_link_never_comes_back() -> None:
    assert frozenset({LinkState.DOWN}) == LINK_TERMINAL
    for event in LinkEvent:
        assert not LINK.allows(LinkState.DOWN, event)


def test_a_connection_survives_lost_links_and_takes_the_next_one() -> None:
    assert _walk_conn(ConnEvent.ATTACH) is ConnState.OPEN
    assert _walk_conn(ConnEvent.ATTACH, ConnEvent.LOST) is ConnState.RECONNECTING
    again = _walk_conn(ConnEvent.ATTACH, ConnEvent.LOST, ConnEvent.ATTACH)
    assert again is ConnState.OPEN
    # the peer called again while this side still had a link: the new one replaces it
    assert _walk_conn(ConnEvent.ATTACH, ConnEvent.ATTACH) is ConnState.OPEN


def test_a_connection_never_opened_is_not_lost_it_is_closed() -> None:
    with pytest.raises(LocalProtocolError):
        _walk_conn(ConnEvent.LOST)
    assert _walk_conn(ConnEvent.CLOSE) is ConnState.CLOSED


def test_a_closed_connection_stays_closed() -> None:
    assert frozenset({ConnState.CLOSED}) == CONN_TERMINAL
    for before in ([], [ConnEvent.ATTACH], [ConnEvent.ATTACH, ConnEvent.LOST]):
        assert _walk_conn(*before, ConnEvent.CLOSE) is ConnState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed cannot take"):
        _walk_conn(ConnEvent.CLOSE, ConnEvent.ATTACH)


def _credit() -> BulkCredit:
    return BulkCredit(window=3, live_window=1, live_quiet=3.0)


def _send(credit: BulkCredit, now: float = 0.0) -> int:
    assert credit.may_send(now)
    seq = credit.sent
    credit.sent_one()
    return seq


def test_bulk_stops_at_the_window_and_each_acknowledgement_returns_credit() -> None:
    credit = _credit()
    assert [_send(credit) for _ in range(3)] == [0, 1, 2]
    assert not credit.may_send(0.0)
    credit.acknowledge(0)
    assert _send(credit) == 3
    assert not credit.may_send(0.0)
    credit.acknowledge(3)  # acknowledging the last covers every chunk before it
    assert credit.in_flight() == 0


def test_while_presence_flows_the_window_shrinks_and_returns_after_the_quiet() -> None:
    credit = _credit()
    credit.presence(now=10.0)
    assert _send(credit, now=10.5) == 0
    assert not credit.may_send(now=12.9)  # one chunk in flight is the live window
    assert credit.current_window(now=13.0) == 3  # quiet long enough
    assert credit.may_send(now=13.0)


def test_the_live_window_never_widens_the_bulk_window() -> None:
    credit = BulkCredit(window=2, live_window=5, live_quiet=3.0)
    credit.presence(now=0.0)
    assert credit.current_window(now=1.0) == 2


def test_an_acknowledgement_of_data_never_sent_is_the_peers_error() -> None:
    credit = _credit()
    _send(credit)
    with pytest.raises(RemoteProtocolError, match="never sent"):
        credit.acknowledge(1)
    credit.acknowledge(0)
    credit.acknowledge(0)  # a repeat (or an older one) changes nothing
    assert credit.acked == 0


def test_a_new_link_numbers_from_zero_but_keeps_presence_recency() -> None:
    credit = _credit()
    credit.presence(now=5.0)
    _send(credit, now=5.0)
    assert credit.consume() == 0
    assert credit.consume() == 1
    credit.new_link()
    assert (credit.sent, credit.acked, credit.consumed) == (0, -1, -1)
    assert credit.current_window(now=6.0) == 1
