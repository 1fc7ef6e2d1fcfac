"""continual: continual learning on pretrained transformers by expansion."""

__version__ = "0.1.0"
