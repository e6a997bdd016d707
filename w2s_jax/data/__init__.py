"""Data sources (JSONL, TFDS) and the synthetic reasoning task."""
