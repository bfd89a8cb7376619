"""llem-serve: gRPC inference-and-measurement server."""

__version__ = "0.1.0"
