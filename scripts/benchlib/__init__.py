"""Helpers of scripts/bench: services it starts, the fake upstream, the naive baselines, the load."""
