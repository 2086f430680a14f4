"""fused_optim's benchmark: every fused op timed beside PyTorch's ways of doing the same work, run as
``python -m fused_optim.benchmark`` (``cli``). The standard inputs are in ``cases``, the side-by-side
timing and the memory-speed yardsticks in ``timing``, one module of rows per op family, with that
family's baselines, in ``rows``, and the table and the speedup plot in ``report``; the
pytest-benchmark files (benchmarks/bench_*.py) import their baselines from the same modules."""
