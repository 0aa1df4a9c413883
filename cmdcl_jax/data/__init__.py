"""Data: annotation parsers, TFDS frame-shard builders, CausalKitchen and the grain pipeline."""
