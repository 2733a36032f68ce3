"""Benchmarks (`make bench`): each prints medians next to a reference measured in the same run."""
