"""Training a pair: the run config, pre-flight, run identity, the three stages and their engines."""
