"""The demo: a registry and nodes on loopback (:mod:`node.demo.story`) sharing the
synthetic head CT of :mod:`node.demo.phantom`."""
