"""``Client`` (blocking) and ``AsyncClient`` (asyncio) for ``llem.v1.LlemService``.

Both take the same arguments, build requests with the same code (``_core``) and
raise the same exceptions (``errors``); they differ only in the gRPC channel
type. Results are the ``llem.v1`` response messages themselves.
"""
from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError
from typing import Any, Union

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llem.v1 import llem_pb2, llem_pb2_grpc

from . import _core
from ._core import UNSET, ConfigLike
from .errors import from_rpc_error

__all__ = ["Client", "AsyncClient", "GenerateCall", "GenerateStream", "AsyncGenerateStream"]

ModelLike = Union[str, llem_pb2.ModelConfig, Mapping[str, Any]]
PathOrPem = Union[bytes, str, os.PathLike, None]


class _Base:
    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: PathOrPem = None,
        certificate_chain: PathOrPem = None,
        private_key: PathOrPem = None,
        server_name: str | None = None,
        timeout: float | None = None,
        targets: Sequence[str] | None = None,
        max_send_message_bytes: int | None = None,
        max_receive_message_bytes: int | None = _core.DEFAULT_MAX_RECEIVE_BYTES,
        options: Sequence[tuple[str, Any]] | None = None,
    ):
        self._settings = _core.channel_settings(
            target,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name=server_name,
            timeout=timeout,
            targets=targets,
            max_send_message_bytes=max_send_message_bytes,
            max_receive_message_bytes=max_receive_message_bytes,
            options=options,
        )
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    @property
    def target(self) -> str:
        """The gRPC target the channel was opened to (after resolving ``targets``)."""
        return self._settings.target

    @property
    def replica_addresses(self) -> list[str]:
        """The servers of a multi-server target (``"h1:p,h2:p"``); ``[]`` for one server.

        A ``dns:///`` target's addresses are the resolver's and are not known here.
        """
        return list(self._settings.replicas)

    def replica(self, address: str) -> Any:
        """A new client of the same kind and credentials for one of :attr:`replica_addresses`
        alone: calls that every replica must see (LoadModel, MeasureBaseline) go through it.
        Close it when done."""
        if address not in self._settings.replicas:
            raise ValueError(f"{address!r} is not one of this client's servers {list(self._settings.replicas)}")
        new = object.__new__(type(self))
        new._settings = self._settings.replica(address)
        new._open()
        return new

    def _timeout(self, timeout: Any) -> float | None:
        return self._settings.timeout if timeout is UNSET else timeout

    def _call_kwargs(self, timeout: Any) -> dict[str, Any]:
        return {"timeout": self._timeout(timeout), "metadata": self._settings.metadata}


# ---------------------------------------------------------------------------
# Blocking client
# ---------------------------------------------------------------------------


class _DeferredSigint:
    """Hold back SIGINT (Ctrl-C) for the block; ``pending`` says whether one came.

    Only in the main thread and only where SIGINT has Python's default handler
    (otherwise the application has its own policy, which is left alone).
    """

    def __init__(self) -> None:
        self.pending = False
        self._old: Any = None

    def _hold(self, signum: int, frame: Any) -> None:
        self.pending = True

    def __enter__(self) -> _DeferredSigint:
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                    self._old = signal.signal(signal.SIGINT, self._hold)
            except (ValueError, OSError):
                self._old = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class GenerateCall:
    """A ``Generate`` in flight (``Client.generate_future``), for callers that keep several
    going from their own threads. ``result()`` blocks for the response and raises what
    ``Client.generate`` raises (``LlemError`` subclasses), or
    ``concurrent.futures.CancelledError`` once cancelled; ``cancel()`` also stops the
    generation on the server."""

    def __init__(self, call: Any):
        self._call = call

    def result(self, timeout: float | None = None) -> llem_pb2.GenerateResponse:
        try:
            return self._call.result(timeout)
        except grpc.FutureCancelledError:
            raise CancelledError() from None
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> bool:
        return self._call.cancel()

    def done(self) -> bool:
        return self._call.done()


class GenerateStream(Iterator[llem_pb2.GenerateStreamResponse]):
    """Iterator over a GenerateStream call; errors arrive as LlemError.

    Leaving the iteration early (``break``, an exception, Ctrl-C, ``close()``)
    cancels the call, so the server stops generating within one decode step.
    """

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> llem_pb2.GenerateStreamResponse:
        try:
            return next(self._call)
        except StopIteration:
            raise
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except BaseException:
            self._call.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the call (a no-op once it has finished)."""
        self._call.cancel()

    close = cancel

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._call.cancel()

    def __del__(self) -> None:
        try:
            self._call.cancel()
        except Exception:
            pass


class Client(_Base):
    """A blocking client for an llem-server.

    Args:
        target: ``"HOST:PORT"``, a ``dns:///host:port`` target (balanced round
            robin over every address), or ``"h1:p,h2:p"``.
        token: sent as ``authorization: Bearer <token>``.
        tls: use TLS with the system's root certificates.
        root_certificates: PEM (bytes, text or a path) of the CA to trust; implies TLS.
        certificate_chain, private_key: the client's certificate and key, for mTLS.
        server_name: the name to verify the server's certificate against.
        timeout: default deadline per call, seconds (``None``: no deadline).
        targets: several ``HOST:PORT`` servers; calls are spread round robin.
        max_send_message_bytes, max_receive_message_bytes: gRPC message limits.
        options: extra gRPC channel options.

    Every method raises a :class:`~llem_client.errors.LlemError` subclass for a
    non-OK status and :class:`~llem_client.errors.ConfigurationError` for
    arguments it can reject before sending.
    """

    def _open(self) -> None:
        s = self._settings
        if s.credentials is not None:
            self._channel = grpc.secure_channel(s.target, s.credentials, options=s.options)
        else:
            self._channel = grpc.insecure_channel(s.target, options=s.options)
        self._stub = llem_pb2_grpc.LlemServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # Context management -----------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # Calls -----------------------------------------------------------------

    def _unary(self, multicallable: Any, request: Any, timeout: Any) -> Any:
        # A KeyboardInterrupt raised inside grpc's own Python code (while it creates
        # the call or holds a call's condition) can leave a lock held, and the
        # channel then hangs on close. So grpc code runs with Ctrl-C deferred, and
        # the wait itself happens here, on a SimpleQueue the done-callback feeds:
        # Ctrl-C lands in this loop, and cancels the call so the server stops.
        done: queue.SimpleQueue = queue.SimpleQueue()
        with _DeferredSigint() as guard:
            fut = multicallable.future(request, **self._call_kwargs(timeout))
            fut.add_done_callback(done.put)
        try:
            if guard.pending:
                raise KeyboardInterrupt
            while True:
                try:
                    done.get(timeout=0.1)  # a short timeout: a signal taken by another thread still gets seen
                    break
                except queue.Empty:
                    pass
        except BaseException:
            with _DeferredSigint():
                fut.cancel()
            raise
        with _DeferredSigint() as guard:
            try:
                result = fut.result()
            except grpc.RpcError as e:
                err: BaseException = from_rpc_error(e)
            else:
                err = None  # type: ignore[assignment]
        if guard.pending:
            raise KeyboardInterrupt
        if err is not None:
            raise err from None
        return result

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        model: ModelLike,
        precision: str | int | None = None,
        pytorch: ConfigLike | None = None,
        decoder: ConfigLike | None = None,
        max_output_tokens: int | None = None,
        max_input_tokens: int | None = None,
        random_seed: int | None = None,
        request_id: str | None = None,
        energy_delivery: str | int | None = None,
        timeout: float | None = UNSET,
    ) -> llem_pb2.GenerateResponse:
        """Run the prompts; returns completions, usage, timing and energy.

        ``pytorch`` and ``decoder`` are dicts (or messages) with the field names
        of config.md; unset (``None``) fields take the server's defaults.
        """
        req = _core.generate_request(
            prompts,
            model=model,
            precision=precision,
            pytorch=pytorch,
            decoder=decoder,
            max_output_tokens=max_output_tokens,
            max_input_tokens=max_input_tokens,
            random_seed=random_seed,
            request_id=request_id,
            energy_delivery=energy_delivery,
        )
        return self.generate_request(req, timeout=timeout)

    def generate_request(self, request: llem_pb2.GenerateRequest, *, timeout: float | None = UNSET) -> llem_pb2.GenerateResponse:
        """Send a ready-made GenerateRequest."""
        return self._unary(self._stub.Generate, request, timeout)

    def generate_future(self, request: llem_pb2.GenerateRequest, *, timeout: float | None = UNSET) -> GenerateCall:
        """Send a ready-made GenerateRequest without waiting: ``llem-client run --in-flight``
        keeps the next request queued this way while an answer waits for its energy.
        Wait on ``result()`` from a worker thread: a Ctrl-C landing inside grpc's own code
        can leave a lock held (``generate`` guards against that; this does not)."""
        return GenerateCall(self._stub.Generate.future(request, **self._call_kwargs(timeout)))

    def generate_stream(
        self,
        prompts: str | Sequence[str],
        *,
        model: ModelLike,
        precision: str | int | None = None,
        pytorch: ConfigLike | None = None,
        decoder: ConfigLike | None = None,
        max_output_tokens: int | None = None,
        max_input_tokens: int | None = None,
        random_seed: int | None = None,
        request_id: str | None = None,
        energy_delivery: str | int | None = None,
        timeout: float | None = UNSET,
    ) -> GenerateStream:
        """Like :meth:`generate`, yielding token chunks and, last, the totals (``final``)."""
        req = _core.generate_request(
            prompts,
            model=model,
            precision=precision,
            pytorch=pytorch,
            decoder=decoder,
            max_output_tokens=max_output_tokens,
            max_input_tokens=max_input_tokens,
            random_seed=random_seed,
            request_id=request_id,
            energy_delivery=energy_delivery,
        )
        with _DeferredSigint() as guard:  # see _unary: never interrupt grpc while it creates a call
            call = self._stub.GenerateStream(req, **self._call_kwargs(timeout))
        if guard.pending:
            call.cancel()
            raise KeyboardInterrupt
        return GenerateStream(call)

    def load_model(
        self,
        model: ModelLike,
        *,
        precision: str | int | None = None,
        pytorch: ConfigLike | None = None,
        request_id: str | None = None,
        timeout: float | None = UNSET,
        strip_generation_fields: bool = False,
    ) -> llem_pb2.LoadModelResponse:
        """Load (and compile) a model ahead of time.

        The server rejects generation fields (``pytorch.batch_size`` ...) here;
        with ``strip_generation_fields=True`` they are dropped first, so the same
        pytorch block as for ``generate`` can be passed.
        """
        cfg = _core.model_config(model, precision, pytorch)
        if strip_generation_fields:
            cfg = _core.load_config(cfg)
        req = llem_pb2.LoadModelRequest(model=cfg, request_id=request_id or "")
        return self._unary(self._stub.LoadModel, req, timeout)

    def unload_model(self, config_hash: str, *, timeout: float | None = UNSET) -> llem_pb2.UnloadModelResponse:
        """Remove a cached model by its config hash."""
        _core.check_config_hash(config_hash)
        return self._unary(self._stub.UnloadModel, llem_pb2.UnloadModelRequest(config_hash=config_hash), timeout)

    def list_models(self, *, timeout: float | None = UNSET) -> llem_pb2.ListModelsResponse:
        """The cached models, most recently used first."""
        return self._unary(self._stub.ListModels, llem_pb2.ListModelsRequest(), timeout)

    def server_info(self, *, timeout: float | None = UNSET) -> llem_pb2.GetServerInfoResponse:
        """Versions, devices, energy sensors and limits."""
        return self._unary(self._stub.GetServerInfo, llem_pb2.GetServerInfoRequest(), timeout)

    def measure_baseline(
        self, duration_s: float | None = None, *, timeout: float | None = UNSET
    ) -> llem_pb2.MeasureBaselineResponse:
        """Measure idle power per device (server default: 30 s)."""
        req = _core.to_message(llem_pb2.MeasureBaselineRequest, {"duration_s": duration_s})
        return self._unary(self._stub.MeasureBaseline, req, timeout)

    def get_energy(
        self, request_ids: str | Sequence[str], *, wait_seconds: float | None = None, timeout: float | None = UNSET
    ) -> llem_pb2.GetEnergyResponse:
        """Energies of requests sent with ``energy_delivery="deferred"``, in the order asked;
        waits up to ``wait_seconds`` (server default 2 s) for ones still settling. Each result's
        ``state`` says whether to ask again (``DEFERRED_ENERGY_STATE_PENDING``) or not."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        req = _core.to_message(llem_pb2.GetEnergyRequest, {"request_ids": ids, "wait_seconds": wait_seconds})
        return self._unary(self._stub.GetEnergy, req, timeout)

    def read_energy(self, *, timeout: float | None = UNSET) -> llem_pb2.ReadEnergyResponse:
        """Each GPU's cumulative energy as of the call (~100 ms: the server waits for the
        counter's next update). :func:`llem_client.energy_between` turns two readings into a
        phase's energy, idle time between requests included."""
        return self._unary(self._stub.ReadEnergy, llem_pb2.ReadEnergyRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = UNSET) -> health_pb2.HealthCheckResponse:
        """``grpc.health.v1.Health/Check``; ``.status`` is SERVING when ready."""
        return self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)


# ---------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------


class AsyncGenerateStream(AsyncIterator[llem_pb2.GenerateStreamResponse]):
    """Async iterator over a GenerateStream call; errors arrive as LlemError."""

    def __init__(self, call: Any):
        self._call = call
        self._it = call.__aiter__()

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> llem_pb2.GenerateStreamResponse:
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            raise
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except BaseException:
            self._call.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the call (a no-op once it has finished)."""
        self._call.cancel()

    close = cancel  # as GenerateStream.close

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._call.cancel()


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`: same arguments, ``async`` methods.

    Use ``async with AsyncClient(...) as c:``; cancelling the awaiting task
    cancels the RPC.
    """

    def _open(self) -> None:
        s = self._settings
        if s.credentials is not None:
            self._channel = grpc.aio.secure_channel(s.target, s.credentials, options=s.options)
        else:
            self._channel = grpc.aio.insecure_channel(s.target, options=s.options)
        self._stub = llem_pb2_grpc.LlemServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _unary(self, multicallable: Any, request: Any, timeout: Any) -> Any:
        try:
            return await multicallable(request, **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def generate(
        self,
        prompts: str | Sequence[str],
        *,
        model: ModelLike,
        precision: str | int | None = None,
        pytorch: ConfigLike | None = None,
        decoder: ConfigLike | None = None,
        max_output_tokens: int | None = None,
        max_input_tokens: int | None = None,
        random_seed: int | None = None,
        request_id: str | None = None,
        energy_delivery: str | int | None = None,
        timeout: float | None = UNSET,
    ) -> llem_pb2.GenerateResponse:
        """See :meth:`Client.generate`."""
        req = _core.generate_request(
            prompts,
            model=model,
            precision=precision,
            pytorch=pytorch,
            decoder=decoder,
            max_output_tokens=max_output_tokens,
            max_input_tokens=max_input_tokens,
            random_seed=random_seed,
            request_id=request_id,
            energy_delivery=energy_delivery,
        )
        return await self.generate_request(req, timeout=timeout)

    async def generate_request(
        self, request: llem_pb2.GenerateRequest, *, timeout: float | None = UNSET
    ) -> llem_pb2.GenerateResponse:
        """Send a ready-made GenerateRequest."""
        return await self._unary(self._stub.Generate, request, timeout)

    def generate_stream(
        self,
        prompts: str | Sequence[str],
        *,
        model: ModelLike,
        precision: str | int | None = None,
        pytorch: ConfigLike | None = None,
        decoder: ConfigLike | None = None,
        max_output_tokens: int | None = None,
        max_input_tokens: int | None = None,
        random_seed: int | None = None,
        request_id: str | None = None,
        energy_delivery: str | int | None = None,
        timeout: float | None = UNSET,
    ) -> AsyncGenerateStream:
        """See :meth:`Client.generate_stream`; iterate with ``async for``."""
        req = _core.generate_request(
            prompts,
            model=model,
            precision=precision,
            pytorch=pytorch,
            decoder=decoder,
            max_output_tokens=max_output_tokens,
            max_input_tokens=max_input_tokens,
            random_seed=random_seed,
            request_id=request_id,
            energy_delivery=energy_delivery,
        )
        return AsyncGenerateStream(self._stub.GenerateStream(req, **self._call_kwargs(timeout)))

    async def load_model(
        self,
        model: ModelLike,
        *,
        precision: str | int | None = None,
        pytorch: ConfigLike | None = None,
        request_id: str | None = None,
        timeout: float | None = UNSET,
        strip_generation_fields: bool = False,
    ) -> llem_pb2.LoadModelResponse:
        """See :meth:`Client.load_model`."""
        cfg = _core.model_config(model, precision, pytorch)
        if strip_generation_fields:
            cfg = _core.load_config(cfg)
        req = llem_pb2.LoadModelRequest(model=cfg, request_id=request_id or "")
        return await self._unary(self._stub.LoadModel, req, timeout)

    async def unload_model(self, config_hash: str, *, timeout: float | None = UNSET) -> llem_pb2.UnloadModelResponse:
        """See :meth:`Client.unload_model`."""
        _core.check_config_hash(config_hash)
        return await self._unary(self._stub.UnloadModel, llem_pb2.UnloadModelRequest(config_hash=config_hash), timeout)

    async def list_models(self, *, timeout: float | None = UNSET) -> llem_pb2.ListModelsResponse:
        """See :meth:`Client.list_models`."""
        return await self._unary(self._stub.ListModels, llem_pb2.ListModelsRequest(), timeout)

    async def server_info(self, *, timeout: float | None = UNSET) -> llem_pb2.GetServerInfoResponse:
        """See :meth:`Client.server_info`."""
        return await self._unary(self._stub.GetServerInfo, llem_pb2.GetServerInfoRequest(), timeout)

    async def measure_baseline(
        self, duration_s: float | None = None, *, timeout: float | None = UNSET
    ) -> llem_pb2.MeasureBaselineResponse:
        """See :meth:`Client.measure_baseline`."""
        req = _core.to_message(llem_pb2.MeasureBaselineRequest, {"duration_s": duration_s})
        return await self._unary(self._stub.MeasureBaseline, req, timeout)

    async def get_energy(
        self, request_ids: str | Sequence[str], *, wait_seconds: float | None = None, timeout: float | None = UNSET
    ) -> llem_pb2.GetEnergyResponse:
        """See :meth:`Client.get_energy`."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        req = _core.to_message(llem_pb2.GetEnergyRequest, {"request_ids": ids, "wait_seconds": wait_seconds})
        return await self._unary(self._stub.GetEnergy, req, timeout)

    async def read_energy(self, *, timeout: float | None = UNSET) -> llem_pb2.ReadEnergyResponse:
        """See :meth:`Client.read_energy`."""
        return await self._unary(self._stub.ReadEnergy, llem_pb2.ReadEnergyRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = UNSET) -> health_pb2.HealthCheckResponse:
        """See :meth:`Client.health`."""
        return await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
