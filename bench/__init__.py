"""Issue 6 benchmark harness: `make bench` (see bench/run.py)."""
