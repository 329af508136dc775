"""One module per command group of the ``radmesh`` CLI."""
