"""UniMRG: multi-representation generation post-training for unified multimodal models."""

__version__ = "0.1.0"
