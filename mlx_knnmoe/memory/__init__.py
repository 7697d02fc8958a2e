"""The memory: file format, fingerprint and validation, router probe, compression, merging."""
