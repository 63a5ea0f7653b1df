"""Compression passes applied to a model from outside: weight-only quantization and pruning (prune.py)."""
