"""Training data: record formats, tokenised pairs, synthetic data."""
