"""The demo: synthetic scenes and the bundled bucket and checkpoint."""
