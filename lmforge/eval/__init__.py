"""Evaluation: log-likelihood scoring, perplexity and bits per byte, multiple choice, generation metrics,
and an adapter that plugs lmforge models into lm-evaluation-harness."""
