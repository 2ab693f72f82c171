"""Per-image statistics summed once, scores, the report and the night-over-night comparison."""
