"""Local datasets to batches: files -> records -> formats -> examples with loss masks -> batches."""
