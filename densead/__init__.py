"""densead: anomaly detection with normalizing flows, per image and per pixel."""

__version__ = "0.1.0"
