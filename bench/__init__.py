"""Benchmarks that print the figures of the README's Results section (issue 7)."""
