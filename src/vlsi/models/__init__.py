"""The models: one entry per backbone family, loading, offline tiny pairs, real shapes."""
