"""The proto is a driver author's only documentation: what it lists must be what the
server sends. Warning codes and ErrorInfo reasons are read from the proto's comments and
compared with the server's source and its table of reasons."""
from __future__ import annotations

import re
from pathlib import Path

from llem_server.errors import REASONS

ROOT = Path(__file__).resolve().parents[1]
PROTO = (ROOT / "proto" / "llem" / "v1" / "llem.proto").read_text()
SERVER = ROOT / "server" / "src" / "llem_server"
STATUS = r"(?:INVALID_ARGUMENT|FAILED_PRECONDITION|PERMISSION_DENIED|NOT_FOUND|RESOURCE_EXHAUSTED|UNAVAILABLE" \
         r"|CANCELLED|INTERNAL|DEADLINE_EXCEEDED|UNAUTHENTICATED)"


def _warning_codes_documented() -> set[str]:
    block = PROTO.split("message Warning {", 1)[1].split("string code = 1;", 1)[0]
    return set(re.findall(r"^\s*//\s+([A-Z][A-Z0-9_]{3,})\s+\S", block, re.M))


def _warning_codes_sent() -> set[str]:
    """Codes in the shapes the server writes warnings: ("CODE", message) tuples, a tuple
    whose code opens the next line, and Warning(code="CODE")."""
    found: set[str] = set()
    for path in SERVER.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'\(\s*"([A-Z][A-Z0-9_]{3,})"\s*,', text))
        found |= set(re.findall(r'code="([A-Z][A-Z0-9_]{3,})"', text))
        found |= set(re.findall(r'\.warn\(\s*"([A-Z][A-Z0-9_]{3,})"', text))
    # not warnings: gRPC status names (LoadError("NOT_FOUND", ...)) and environment variables
    return {c for c in found if not re.fullmatch(STATUS, c) and not c.startswith(("LLEM_", "CUDA_", "NVML_"))}


def test_every_warning_code_the_server_sends_is_listed_in_the_proto():
    sent, documented = _warning_codes_sent(), _warning_codes_documented()
    assert len(sent) >= 19  # the scan still finds them
    assert sent - documented == set(), "add these to llem.proto's Warning.code comment"
    assert documented - sent == set(), "llem.proto lists codes the server no longer sends"


def test_every_error_reason_is_listed_in_the_proto_with_its_status():
    header = PROTO.split("syntax =", 1)[0]
    listed = dict(re.findall(r"^//\s+([A-Z][A-Z_]+)\s+(" + STATUS + r")\s", header, re.M))
    assert listed == REASONS
