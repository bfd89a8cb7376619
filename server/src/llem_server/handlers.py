"""LlemService's gRPC method handlers, built from the contract's descriptor.

grpc's generated registration parses each request (``FromString``) before the servicer
runs, and answers a parse failure UNKNOWN with a Python exception as its message and no
``ErrorInfo``. A client can send such bytes without meaning to: a string field holding
half a surrogate pair is invalid UTF-8 once encoded (protobufjs does it from a JavaScript
string sliced mid-emoji). So requests are parsed here: one that is not valid protobuf is
answered INVALID_ARGUMENT (reason INVALID_REQUEST) naming the parse error, and an
exception that escapes a servicer method is answered INTERNAL (INTERNAL_ERROR), never
UNKNOWN (service.md: UNKNOWN and INTERNAL mean a bug in the server, never the input).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError
from llem.v1 import llem_pb2

from .errors import ServiceError, abort

SERVICE = llem_pb2.DESCRIPTOR.services_by_name["LlemService"]
_log = logging.getLogger("llem_server.handlers")


def _bad_request(cls: type, exc: Exception) -> ServiceError:
    what = f"the request is not a valid {cls.DESCRIPTOR.full_name}: {exc}"
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, what + " (invalid UTF-8 in a string field? "
                        "check how the client encodes text)", violations=[("request", what)])


def _internal(method: str, exc: Exception) -> ServiceError:
    _log.error("unhandled exception in %s", method, exc_info=exc)
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}",
                        reason="INTERNAL_ERROR")


def _unary(method: str, cls: type, resp_cls: type, behaviour: Callable) -> Callable:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = cls.FromString(data)
        except DecodeError as exc:
            await abort(context, _bad_request(cls, exc))
        try:
            result = await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except ServiceError as err:  # meant for the caller: its own status
            await abort(context, err)
        except Exception as exc:  # noqa: BLE001 - answered INTERNAL with details, not UNKNOWN
            await abort(context, _internal(method, exc))
        if not isinstance(result, resp_cls):  # grpc would fail serialising it: UNKNOWN
            await abort(context, _internal(method, TypeError(f"answered {type(result).__name__}, "
                                                             f"not {resp_cls.DESCRIPTOR.full_name}")))
        return result
    return handle


def _streaming(method: str, cls: type, behaviour: Callable) -> Callable:
    async def handle(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = cls.FromString(data)
        except DecodeError as exc:
            await abort(context, _bad_request(cls, exc))
        stream = behaviour(request, context)
        try:
            async for item in stream:
                yield item
        except grpc.aio.AbortError:
            raise
        except ServiceError as err:
            await abort(context, err)
        except Exception as exc:  # noqa: BLE001
            await abort(context, _internal(method, exc))
        finally:  # closed early (the caller went away): the servicer's own cleanup runs now
            await stream.aclose()
    return handle


def generic_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """Every LlemService method of ``servicer``, parsing requests itself (see above)."""
    handlers = {}
    for m in SERVICE.methods:
        req_cls = getattr(llem_pb2, m.input_type.name)
        resp_cls = getattr(llem_pb2, m.output_type.name)
        behaviour = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _streaming(m.name, req_cls, behaviour), response_serializer=resp_cls.SerializeToString)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(m.name, req_cls, resp_cls, behaviour), response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
