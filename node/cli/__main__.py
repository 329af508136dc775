"""`python -m node.cli`: the radmesh command."""

from node.cli import run

run()
