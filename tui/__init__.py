"""radmesh tui."""
