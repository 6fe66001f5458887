"""Evaluation: ROUGE and loss."""
