"""radmesh consult."""
