"""Data-loss-prevention sidecar: an Envoy external-processing server for model endpoints."""

__version__ = "0.1.0"
