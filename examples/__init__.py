"""End-to-end examples of maqd-kernels on real data: ``python examples/run_all.py``."""
