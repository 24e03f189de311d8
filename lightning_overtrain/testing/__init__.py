"""Stand-ins for tests, examples and benchmarks: the demo model and text, synthetic curves."""
