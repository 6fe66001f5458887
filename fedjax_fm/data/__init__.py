"""Summarisation data for federated clients: sources, prompts, tokenisation, partitioners, static batches."""
