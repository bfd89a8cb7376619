"""Python client for llem-serve: remote generation with per-request GPU energy.

    from llem_client import Client
    with Client("127.0.0.1:50051") as c:
        r = c.generate(["Hello"], model="demo", max_output_tokens=16)
        print(r.completions[0].text, r.energy.total_j if r.energy.available else r.energy.unavailable_reason)

Importing this package loads grpc and the generated stubs only (no torch, no
transformers, no rich); the CLI lives in ``llem_client.cli``.
"""
from __future__ import annotations

from .client import AsyncClient, AsyncGenerateStream, Client, GenerateCall, GenerateStream
from .convert import message_to_dict, to_message
from .readings import energy_between
from .errors import (
    Cancelled,
    ConfigurationError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LlemError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "Cancelled",
    "Client",
    "ConfigurationError",
    "DeadlineExceeded",
    "energy_between",
    "FailedPrecondition",
    "GenerateCall",
    "GenerateStream",
    "Internal",
    "InvalidArgument",
    "LlemError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "from_rpc_error",
    "message_to_dict",
    "to_message",
]
