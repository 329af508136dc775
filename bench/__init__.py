"""radmesh benchmarks: not tests; each prints its figures and ratios to a baseline."""
