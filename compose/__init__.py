"""compose: network-namespace labs for tests, demos and benchmarks (see compose/README.md)."""
