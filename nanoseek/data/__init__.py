"""Data: the tokenizer, pretraining token shards, and their loaders."""
