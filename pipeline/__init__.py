"""Ingest (video -> WebDataset shards of Lab clips) and the training data loader."""
