"""Datasets: image sets for image-level detection, road scenes for dense maps."""
