"""radmesh node."""
