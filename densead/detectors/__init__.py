"""Detectors: scores per image and maps per pixel, higher = more anomalous."""

from densead.detectors.glow import DETECTORS, MIN_LOG_PROB, GlowDetector, GlowScorer, get_detector

__all__ = ["DETECTORS", "MIN_LOG_PROB", "GlowDetector", "GlowScorer", "get_detector"]
