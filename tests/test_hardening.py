"""Production hardening, end to end against real ``llem-server`` processes: security and limits.

* bearer tokens (none, wrong, right) on unary and streaming calls; health and reflection open;
* TLS + mTLS with a PKI made in the test (plaintext, no client certificate, a foreign CA, an
  untrusted server are all refused before any RPC);
* model names confined to ``--model-root`` (``..``, absolute paths, links out), hub ids only
  with ``--allow-hub``, ``trust_remote_code`` only with ``--allow-remote-code``;
* limits on prompts, input and output tokens and message size: INVALID_ARGUMENT naming the limit;
* a hypothesis fuzz over GenerateRequest fields: never UNKNOWN or INTERNAL, server healthy after.

Fault handling is in ``test_faults.py``, health/metrics/logs/replicas in ``test_observability.py``.
"""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llem.v1 import llem_pb2, llem_pb2_grpc
from llem_client import Client
from llem_client.errors import InvalidArgument, LlemError, PermissionDenied, Unauthenticated

from _hardening import CLIENT_STATUSES, code_of, field_violations, hard_root, hard_server  # noqa: F401
from conftest import start_server, stop_server
from pki import make_test_pki

TOKEN = "tok-hardening-0123456789abcdef"
LIMITS = {"max_prompts": 2, "max_output_tokens": 16, "max_input_tokens": 32, "max_message_bytes": 4096}


# -- the secured server: mTLS + bearer tokens + tight limits + hub and remote code allowed -------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_test_pki(tmp_path_factory.mktemp("pki"))


HUB_ID, HUB_COMMIT = "test-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(home, model_dir):
    """An offline hub cache (the layout huggingface_hub writes) holding HUB_ID at HUB_COMMIT, "main"."""
    import shutil

    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return home


@pytest.fixture(scope="module")
def secure(pki, hard_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure-server")
    tokens = tmp / "tokens"
    tokens.write_text(f"# test tokens\n{TOKEN}\n")
    tokens.chmod(0o600)
    limits = [a for k, v in LIMITS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    srv = start_server(tmp, hard_root, "--auth-token-file", str(tokens),
                       "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                       "--tls-client-ca", str(pki.ca_cert), "--allow-hub", "--allow-remote-code", *limits,
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(_fake_hub(tmp / "hf", hard_root / "llama"))})
    yield srv
    stop_server(srv)


def _client(secure, pki, token=TOKEN, **kw) -> Client:
    args = dict(token=token, root_certificates=pki.ca_cert, certificate_chain=pki.client_cert,
                private_key=pki.client_key, timeout=60)
    args.update(kw)
    return Client(secure.address, **args)


def _secure_channel(secure, pki, *, cert=None, key=None, ca=None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca_cert).read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)
    return grpc.secure_channel(secure.address, creds)


def _health(channel, service: str = "") -> grpc.StatusCode:
    code, _ = code_of(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest(service=service),
                      timeout=10)
    return code


# -- authentication ------------------------------------------------------------------------------

@pytest.mark.parametrize("token", [None, "tok-wrong-0123456789abcdef", TOKEN[:-1], TOKEN + "x"],
                         ids=["none", "wrong", "prefix", "longer"])
def test_bad_or_missing_token_is_unauthenticated(secure, pki, token):
    with _client(secure, pki, token=token) as c:
        with pytest.raises(Unauthenticated):
            c.generate("hi", model="llama", max_output_tokens=2)
        with pytest.raises(Unauthenticated):  # server streaming ends cleanly too
            list(c.generate_stream("hi", model="llama", max_output_tokens=2))
        with pytest.raises(Unauthenticated):
            c.list_models()


def test_right_token_serves(secure, pki):
    with _client(secure, pki) as c:
        r = c.generate("hello", model="llama", max_output_tokens=4, decoder={"do_sample": False})
        assert r.usage.output_tokens == 4
        chunks = list(c.generate_stream("hello", model="llama", max_output_tokens=4, decoder={"do_sample": False}))
        assert chunks[-1].final.usage.output_tokens == 4


def test_health_and_reflection_open_without_token(secure, pki):
    ch = _secure_channel(secure, pki, cert=pki.client_cert, key=pki.client_key)
    assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="llem.v1.LlemService"), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"llem.v1.LlemService", "grpc.health.v1.Health"} <= names
    # ... but the service itself is closed without a token.
    code, _ = code_of(llem_pb2_grpc.LlemServiceStub(ch).ListModels, llem_pb2.ListModelsRequest(), timeout=10)
    assert code == grpc.StatusCode.UNAUTHENTICATED


# -- TLS / mTLS ------------------------------------------------------------------------------------

def test_mtls_refuses_before_any_rpc(secure, pki):
    # plaintext against a TLS port
    assert _health(grpc.insecure_channel(secure.address)) == grpc.StatusCode.UNAVAILABLE
    # TLS without a client certificate (mTLS required)
    assert _health(_secure_channel(secure, pki)) == grpc.StatusCode.UNAVAILABLE
    # a client certificate from a CA the server does not trust
    assert _health(_secure_channel(secure, pki, cert=pki.other_client_cert, key=pki.other_client_key)) == \
        grpc.StatusCode.UNAVAILABLE
    # the client does not trust the server's CA
    assert _health(_secure_channel(secure, pki, cert=pki.client_cert, key=pki.client_key, ca=pki.other_ca_cert)) == \
        grpc.StatusCode.UNAVAILABLE
    # the right chain both ways
    assert _health(_secure_channel(secure, pki, cert=pki.client_cert, key=pki.client_key)) == grpc.StatusCode.OK


# -- model names, hub ids, remote code -----------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "../llama", "../../../../etc", "llama/../../llama", "/etc", "/", "escape", "linked-weights", "escape/../escape",
])
def test_model_names_stay_under_the_root(secure, pki, hard_root, name):
    with _client(secure, pki) as c:
        with pytest.raises(PermissionDenied) as err:
            c.generate("hi", model=name, max_output_tokens=2)
    assert str(hard_root.parent) not in err.value.details  # no server layout in the answer


@pytest.mark.parametrize("name,code", [
    ("nope", grpc.StatusCode.NOT_FOUND), ("not-a-model", grpc.StatusCode.NOT_FOUND),
    (".", grpc.StatusCode.NOT_FOUND), ("llama\n", grpc.StatusCode.INVALID_ARGUMENT),
    ("x" * 600, grpc.StatusCode.INVALID_ARGUMENT), ("", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_model_names(stub, name, code):
    req = llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model=name), prompts=["hi"], max_output_tokens=2)
    got, _ = code_of(stub.Generate, req, timeout=60)
    assert got == code


def test_link_inside_the_root_is_served(secure, pki):
    with _client(secure, pki) as c:
        assert c.generate("hi", model="inner", max_output_tokens=2).usage.output_tokens == 2


def test_hub_ids_need_allow_hub(stub, secure, pki):
    req = llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model="some-org/some-model"), prompts=["hi"],
                                   max_output_tokens=2)
    code, err = code_of(stub.Generate, req, timeout=60)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "--allow-hub" in err.details()
    # Allowed (and offline here): the name passes the check and the load fails with a clear status.
    with _client(secure, pki) as c:
        with pytest.raises(LlemError) as err:
            c.generate_request(req)
    assert err.value.code in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}, err.value
    assert "some-org/some-model" in err.value.details


def test_a_hub_model_records_the_commit_its_revision_resolved_to(secure, pki):
    """config.md §5: where the model is a hub id, the resolved commit is recorded beside the key."""
    with _client(secure, pki) as c:
        r = c.generate(["hi"], model=HUB_ID, max_output_tokens=2)
        assert r.effective_config.resolved_revision == HUB_COMMIT
        listed = [m for m in c.list_models().models if m.config_hash == r.config_hash]
        assert [m.resolved_revision for m in listed] == [HUB_COMMIT]
        local = c.generate(["hi"], model="llama", max_output_tokens=2)
        assert local.effective_config.resolved_revision == ""


def test_remote_code_needs_allow_remote_code(stub, secure, pki):
    req = llem_pb2.GenerateRequest(
        model=llem_pb2.ModelConfig(model="llama", pytorch=llem_pb2.PyTorchConfig(trust_remote_code=True)),
        prompts=["hi"], max_output_tokens=2)
    code, err = code_of(stub.Generate, req, timeout=60)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "model.pytorch.trust_remote_code" in {f for f, _ in field_violations(err)}
    code, err = code_of(stub.LoadModel, llem_pb2.LoadModelRequest(model=req.model), timeout=60)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    with _client(secure, pki) as c:  # started with --allow-remote-code
        assert c.generate_request(req).usage.output_tokens == 2


# -- limits ---------------------------------------------------------------------------------------------

def test_limits_are_reported(secure, pki):
    with _client(secure, pki) as c:
        limits = c.server_info().limits
    assert (limits.max_prompts, limits.max_output_tokens, limits.max_input_tokens, limits.max_message_bytes) == \
        tuple(LIMITS.values())


@pytest.mark.parametrize("kwargs,limit,field", [
    ({"prompts": ["a", "b", "c"]}, "max_prompts", "prompts"),
    ({"max_output_tokens": 17}, "max_output_tokens", "max_output_tokens"),
    ({"max_output_tokens": 2**31 - 1}, "max_output_tokens", "max_output_tokens"),
    ({"max_input_tokens": 33}, "max_input_tokens", "max_input_tokens"),
    ({"prompts": ["word " * 1000]}, "max_message_bytes", "prompts"),
], ids=["prompts", "output", "output-huge", "input", "message"])
def test_limits_answer_invalid_argument_naming_the_limit(secure, pki, kwargs, limit, field):
    args = {"prompts": ["hi"], "max_output_tokens": 2, **kwargs}
    with _client(secure, pki) as c:
        with pytest.raises(InvalidArgument) as err:
            c.generate(args.pop("prompts"), model="llama", **args)
    assert limit in err.value.details
    assert field in {f for f, _ in err.value.field_violations}


def test_at_the_limits_is_served(secure, pki):
    with _client(secure, pki) as c:
        r = c.generate(["word " * 100, "b"], model="llama", max_output_tokens=16, max_input_tokens=32,
                       decoder={"min_new_tokens": 16})
    assert [x.output_tokens for x in r.completions] == [16, 16]
    assert r.completions[0].input_tokens == 32  # truncated to max_input_tokens


def test_message_far_over_the_limit_is_refused_by_the_transport(secure, pki):
    # Beyond twice --max-message-bytes gRPC itself refuses the message before it is parsed.
    with _client(secure, pki) as c:
        with pytest.raises(LlemError) as err:
            c.generate("x" * 10000, model="llama", max_output_tokens=2)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details


def test_secure_server_still_healthy(secure, pki):
    assert _health(_secure_channel(secure, pki, cert=pki.client_cert, key=pki.client_key)) == grpc.StatusCode.OK
    assert secure.proc.poll() is None
    assert '"level": "error"' not in secure.log()


# -- fuzz -------------------------------------------------------------------------------------------------

_NAMES = ["llama", "gpt2", "inner", "corrupt", "garbled", "missing", "oom-gen", "oom-load", "escape",
          "linked-weights", "not-a-model", "../llama", "/etc/passwd", "llama/../..", "org/model", ".", "",
          " llama", "llama\x00", "llama\n", "x" * 513, "nope"]
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
_int32 = st.one_of(st.integers(-3, 8), st.sampled_from([2**31 - 1, -2**31, 100_000]))
_enum = st.one_of(st.integers(0, 7), st.sampled_from([-1, 99, 2**31 - 1]))
_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, 1e-300]))


def _maybe(s):
    return st.one_of(st.none(), s)


_bool = st.booleans()
_string = st.one_of(st.sampled_from(["default", "auto", "cpu", "cuda", "cuda:7", "main", "eager", "../x", ""]), _text)
# field path -> values; each request sets a few of them on top of a valid base request, so the fuzz
# reaches the worker (loads, generation, streaming) as well as the validation in front of it.
_FIELDS = {
    "model.model": st.one_of(st.sampled_from(_NAMES), _text),
    "model.precision": _enum,
    **{f"model.pytorch.{n}": _enum for n in ("attn_implementation", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type",
                                             "cache_implementation")},
    **{f"model.pytorch.{n}": _bool for n in ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant",
                                             "trust_remote_code", "use_cache", "early_stopping", "torch_compile")},
    **{f"model.pytorch.{n}": _string for n in ("torch_compile_mode", "torch_compile_backend", "device_map",
                                               "revision")},
    "model.pytorch.max_memory": st.dictionaries(st.sampled_from(["0", "cpu", "x", "-1"]),
                                                st.sampled_from(["1GiB", "10MB", "-1", "lots", ""]), max_size=2),
    **{f"model.pytorch.{n}": _int32 for n in ("batch_size", "num_beams", "no_repeat_ngram_size",
                                              "prompt_lookup_num_tokens", "num_processes")},
    "model.pytorch.length_penalty": _float,
    **{f"decoder.{n}": _float for n in ("temperature", "top_p", "repetition_penalty", "min_p")},
    "decoder.top_k": _int32,
    "decoder.min_new_tokens": _int32,
    "decoder.do_sample": _bool,
    "decoder.preset": _enum,
    "prompts": st.lists(_text, max_size=5),
    "max_input_tokens": _int32,
    "max_output_tokens": _int32,  # small or far over the limit: generations stay short
    "random_seed": st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, -1])),
    "request_id": _text,
}


def _set(msg, path: str, value) -> None:
    *parents, name = path.split(".")
    for p in parents:
        msg = getattr(msg, p)
    if isinstance(value, dict):
        getattr(msg, name).clear()
        getattr(msg, name).update(value)
    elif isinstance(value, list):
        del getattr(msg, name)[:]
        getattr(msg, name).extend(value)
    else:
        setattr(msg, name, value)


@st.composite
def generate_requests(draw) -> llem_pb2.GenerateRequest:
    req = llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model=draw(st.sampled_from(["llama", "gpt2"]))),
                                   prompts=draw(st.lists(_text, min_size=1, max_size=3)),
                                   max_output_tokens=draw(st.integers(1, 6)))
    for path in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=4, unique=True)):
        _set(req, path, draw(_FIELDS[path]))
    pt = req.model.pytorch
    if pt.torch_compile and not pt.HasField("torch_compile_backend"):
        pt.torch_compile_backend = "eager"  # inductor would compile for minutes on this CPU
    return req


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=generate_requests(), stream=st.booleans())
def test_fuzz_generate_never_unknown_or_internal(hard_server, req, stream):
    stub = llem_pb2_grpc.LlemServiceStub(_fuzz_channel(hard_server))
    if stream:
        code, err = code_of(lambda: list(stub.GenerateStream(req, timeout=60)))
    else:
        code, err = code_of(stub.Generate, req, timeout=60)
    assert code in CLIENT_STATUSES, f"{code}: {getattr(err, 'details', lambda: err)()}\n{req}"


_channels: dict[str, grpc.Channel] = {}


def _fuzz_channel(server) -> grpc.Channel:
    if server.address not in _channels:
        _channels[server.address] = server.channel()
    return _channels[server.address]


def test_fuzzed_server_still_healthy(hard_server):
    ch = _fuzz_channel(hard_server)
    assert _health(ch) == grpc.StatusCode.OK
    r = llem_pb2_grpc.LlemServiceStub(ch).Generate(llem_pb2.GenerateRequest(
        model=llem_pb2.ModelConfig(model="llama"), prompts=["still here"], max_output_tokens=3), timeout=60)
    assert r.usage.output_tokens >= 1
    assert hard_server.proc.poll() is None
    assert '"status": "INTERNAL"' not in hard_server.log() and '"status": "UNKNOWN"' not in hard_server.log()
