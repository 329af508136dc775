"""radmesh registry."""
