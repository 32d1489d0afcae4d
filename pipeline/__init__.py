"""sppscl: SPP-SCL image-text sentiment analysis as a two-stage, feature-caching pipeline."""
__version__ = "0.1.0"
