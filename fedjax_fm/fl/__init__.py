"""Federated core: client update, aggregation, server optimisers, sampling, algorithms, execution backends."""
