"""Energy and efficiency: power sampling backends, metering of compiled calls, FLOPs/MFU, communication."""
