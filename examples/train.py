"""Trains a small model with every fused_optim feature: see fused_optim/demo.py.

    python examples/train.py [--device cuda] [--epochs N]
"""

from fused_optim.demo import main

if __name__ == "__main__":
    main()
