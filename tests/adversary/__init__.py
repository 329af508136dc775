"""Attacks on radmesh, one module per boundary (registry, signaling, transport,
transfer, live, control, dicom, tui). Each test is an attack that once worked:
it fails on the code that had the hole and passes now."""
