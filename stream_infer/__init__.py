"""stream-infer: streaming inference for Kafka."""

__version__ = "0.1.0"
