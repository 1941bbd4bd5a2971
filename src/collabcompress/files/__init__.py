"""Files: checkpoints, families, the output rule, the manifest, statistics, texts."""
