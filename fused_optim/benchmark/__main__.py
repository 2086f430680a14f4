"""``python -m fused_optim.benchmark``: runs ``cli.main`` (the command line lives in ``cli``, so that
tests import ``main`` without importing a ``__main__`` module)."""

from fused_optim.benchmark.cli import main

main()
