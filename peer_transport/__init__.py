"""radmesh peer_transport."""
