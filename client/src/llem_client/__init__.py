"""Python client for llem-serve."""
