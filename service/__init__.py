"""Feature Map Service: shows what a convolutional network sees, over HTTP."""

__version__ = "0.1.0"
