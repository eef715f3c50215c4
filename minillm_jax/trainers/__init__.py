"""One small module per method, sharing the optimizer and train state in `common.py`."""
