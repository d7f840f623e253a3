"""Benchmarks (``make bench``). Ratios in one run are the claim, not absolute times."""
