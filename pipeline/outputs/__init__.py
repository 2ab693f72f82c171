"""A run's folder: part files, their summaries, the writer stage, manifest and console."""
