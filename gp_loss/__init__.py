"""gp-loss: discover loss functions for image classifiers by genetic programming."""
__version__ = "0.1.0"
