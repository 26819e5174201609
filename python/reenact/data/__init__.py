"""Training data: dataset preparation, DALI pipeline, fallback loader, synthetic data."""
