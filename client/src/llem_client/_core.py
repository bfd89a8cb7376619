"""What Client and AsyncClient share: channel settings and request building.

Nothing here opens a channel or sends anything; the two clients differ only in
the channel type (``grpc`` vs ``grpc.aio``) and in how they wait.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import grpc

from llem.v1 import llem_pb2

from .convert import generation_field_numbers, to_message
from .errors import ConfigurationError

#: Default largest message the client accepts: completions of a big batch carry
#: token ids, which passes gRPC's 4 MiB default quickly.
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024

#: llem-server's default port: an address without one means it (gRPC alone would dial 443).
DEFAULT_PORT = 50051

_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: Sentinel for "use the client's default" (``None`` already means "no deadline").
UNSET: Any = _Unset()


def _read_pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    """PEM bytes from bytes, a PEM string, or a path to a PEM file."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    text = os.fspath(value)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    try:
        with open(text, "rb") as fh:
            return fh.read()
    except OSError as e:
        raise ConfigurationError([(what, f"cannot read {text!r}: {e.strerror or e}")]) from None


def with_default_port(addr: str) -> str:
    """``HOST`` -> ``HOST:50051`` (``[v6]:50051``); a port or a scheme (``dns:``, ``unix:``) is kept."""
    a = addr.strip()
    if a.startswith("["):
        return a if "]:" in a else f"{a}:{DEFAULT_PORT}"
    try:
        ip = ipaddress.ip_address(a)
    except ValueError:
        return a if ":" in a else f"{a}:{DEFAULT_PORT}"
    return f"[{a}]:{DEFAULT_PORT}" if ip.version == 6 else f"{a}:{DEFAULT_PORT}"


def _split_host_port(addr: str) -> tuple[str, str]:
    if addr.startswith("["):  # [::1]:50051
        host, _, port = addr[1:].partition("]:")
        return host, port
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigurationError([("targets", f"{addr!r} is not HOST:PORT")])
    return host, port


def _multi_address_target(targets: Sequence[str]) -> str:
    """``ipv4:a:p,b:p`` (or ``ipv6:``) for gRPC core's static multi-address resolver.

    Host names are resolved once, here; use a ``dns:///`` target where the
    addresses change while the client lives.
    """
    v4: list[str] = []
    v6: list[str] = []
    for addr in targets:
        host, port = _split_host_port(addr.strip())
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except (OSError, ValueError) as e:
                raise ConfigurationError([("targets", f"cannot resolve {addr!r}: {e}")]) from None
            # One address per host: the first the resolver prefers.
            ips = [ipaddress.ip_address(infos[0][4][0])] if infos else []
        for ip in ips:
            (v4 if ip.version == 4 else v6).append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if v4 and v6:
        raise ConfigurationError([("targets", "mixes IPv4 and IPv6 addresses; gRPC's static resolver takes one family")])
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6))


@dataclass
class ChannelSettings:
    """Everything needed to open a channel to one server or a set of servers."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]] = field(default_factory=list)
    metadata: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None
    # The HOST:PORT servers of a multi-server target (h1:p,h2:p): each can be dialled alone
    # when every replica must see a call (a model load); empty for one server or a dns: target.
    replicas: tuple[str, ...] = ()

    def replica(self, address: str) -> ChannelSettings:
        """These settings for one of the replicas alone (no round robin)."""
        opts = [(k, v) for k, v in self.options if k != "grpc.service_config"]
        return ChannelSettings(address, self.credentials, opts, self.metadata, self.timeout)


def channel_settings(
    target: str | None,
    *,
    token: str | None = None,
    tls: bool = False,
    root_certificates: bytes | str | os.PathLike | None = None,
    certificate_chain: bytes | str | os.PathLike | None = None,
    private_key: bytes | str | os.PathLike | None = None,
    server_name: str | None = None,
    timeout: float | None = None,
    targets: Sequence[str] | None = None,
    max_send_message_bytes: int | None = None,
    max_receive_message_bytes: int | None = DEFAULT_MAX_RECEIVE_BYTES,
    options: Iterable[tuple[str, Any]] | None = None,
) -> ChannelSettings:
    """Validate the client's connection arguments into ChannelSettings."""
    if targets is not None and isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    # "h1:p,h2:p" without a scheme is a list of servers, like targets=[...].
    if target and "," in target and not target.startswith(("ipv4:", "ipv6:", "dns:", "unix:")):
        targets, target = [t for t in target.split(",") if t.strip()], None
    if targets:
        if target:
            raise ConfigurationError([("targets", "give either target or targets, not both")])
        targets = [with_default_port(t) for t in targets]
        resolved = targets[0] if len(targets) == 1 else _multi_address_target(targets)
        balance = len(targets) > 1
    elif target:
        resolved = target = with_default_port(target)
        balance = target.startswith("dns:") or target.startswith(("ipv4:", "ipv6:"))
    else:
        raise ConfigurationError([("target", "no server address given (HOST:PORT)")])

    opts: list[tuple[str, Any]] = []
    if balance:
        opts.append(("grpc.service_config", _ROUND_ROBIN))
    if max_send_message_bytes is not None:
        opts.append(("grpc.max_send_message_length", int(max_send_message_bytes)))
    if max_receive_message_bytes is not None:
        opts.append(("grpc.max_receive_message_length", int(max_receive_message_bytes)))
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    opts.extend(options or ())

    root = _read_pem(root_certificates, "root_certificates")
    chain = _read_pem(certificate_chain, "certificate_chain")
    key = _read_pem(private_key, "private_key")
    if (chain is None) != (key is None):
        raise ConfigurationError([("certificate_chain", "mTLS needs both certificate_chain and private_key")])
    creds = None
    if tls or root is not None or chain is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    # The token goes in plain metadata rather than call credentials: grpc refuses
    # call credentials on insecure channels, and loopback/dev servers are insecure.
    metadata: tuple[tuple[str, str], ...] = ()
    if token:
        metadata = (("authorization", f"Bearer {token}"),)
    replicas = tuple(t.strip() for t in targets) if targets and len(targets) > 1 else ()
    return ChannelSettings(resolved, creds, opts, metadata, timeout, replicas)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

# A dict of fields or the message itself (typing.Union: `|` with Any fails on Python 3.10).
ConfigLike = Union[Mapping[str, Any], Any]


def model_config(
    model: str | llem_pb2.ModelConfig | Mapping[str, Any],
    precision: str | int | None = None,
    pytorch: ConfigLike | None = None,
) -> llem_pb2.ModelConfig:
    """A ModelConfig from a model name (or config), a precision and a pytorch block."""
    problems: list[tuple[str, str]] = []
    if isinstance(model, str):
        base: dict[str, Any] = {"model": model}
        msg = llem_pb2.ModelConfig()
    elif isinstance(model, (llem_pb2.ModelConfig, Mapping)):
        base = {}
        try:
            msg = to_message(llem_pb2.ModelConfig, model, "model")  # type: ignore[assignment]
        except ConfigurationError as e:
            problems.extend(e.problems)
            msg = llem_pb2.ModelConfig()
    else:
        raise ConfigurationError([("model", f"expected a model name, a ModelConfig or a dict, got {type(model).__name__}")])
    if precision is not None:
        base["precision"] = precision
    if pytorch is not None:
        base["pytorch"] = pytorch
    try:
        msg.MergeFrom(to_message(llem_pb2.ModelConfig, base))
    except ConfigurationError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigurationError(problems)
    return msg  # type: ignore[return-value]


def check_config_hash(config_hash: str) -> None:
    """A blank hash names no model: refuse it rather than send it."""
    if not isinstance(config_hash, str) or not config_hash.strip():
        raise ConfigurationError([("config_hash", f"expected a config hash, got {config_hash!r}")])


def load_config(model_cfg: llem_pb2.ModelConfig) -> llem_pb2.ModelConfig:
    """The load part of a ModelConfig: LoadModel rejects generation fields."""
    out = llem_pb2.ModelConfig()
    out.CopyFrom(model_cfg)
    for name in generation_field_numbers(llem_pb2.PyTorchConfig.DESCRIPTOR):
        out.pytorch.ClearField(name)
    if not out.pytorch.ListFields():
        out.ClearField("pytorch")
    return out


def generate_request(
    prompts: str | Sequence[str],
    *,
    model: str | llem_pb2.ModelConfig | Mapping[str, Any],
    precision: str | int | None = None,
    pytorch: ConfigLike | None = None,
    decoder: ConfigLike | None = None,
    max_output_tokens: int | None = None,
    max_input_tokens: int | None = None,
    random_seed: int | None = None,
    request_id: str | None = None,
    energy_delivery: str | int | None = None,
) -> llem_pb2.GenerateRequest:
    """A GenerateRequest; every problem in the arguments is reported at once."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)  # a generator is read once
    problems: list[tuple[str, str]] = []
    for i, text in enumerate(prompts):
        try:
            text.encode("utf-8") if isinstance(text, str) else None
        except UnicodeEncodeError as e:  # a lone surrogate: half of a character, not sendable
            problems.append((f"prompts[{i}]", f"not valid text: {e.reason} at position {e.start} "
                                              "(half of a character, e.g. a string cut inside an emoji)"))
    if problems:
        prompts = []
    req = llem_pb2.GenerateRequest()
    try:
        req.model.CopyFrom(model_config(model, precision, pytorch))
    except ConfigurationError as e:
        problems.extend(e.problems)
    if decoder is not None:
        try:
            req.decoder.CopyFrom(to_message(llem_pb2.DecoderConfig, decoder, "decoder"))
        except ConfigurationError as e:
            problems.extend(e.problems)
    try:
        req.MergeFrom(
            to_message(
                llem_pb2.GenerateRequest,
                {
                    "prompts": list(prompts),
                    "max_output_tokens": max_output_tokens,
                    "max_input_tokens": max_input_tokens,
                    "random_seed": random_seed,
                    "request_id": request_id,
                    "energy_delivery": energy_delivery,
                },
            )
        )
    except ConfigurationError as e:
        problems.extend(e.problems)
    if not problems and not req.prompts:
        problems.append(("prompts", "at least one prompt is needed"))
    if problems:
        raise ConfigurationError(problems)
    return req
