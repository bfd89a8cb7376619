"""dict -> llem.v1 message mapping in llem_client (no server needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf import descriptor as _d

from llem.v1 import llem_pb2
from llem_client import ConfigurationError, message_to_dict, to_message
from llem_client import _core
from llem_client.convert import enum_short_names


def _sample(field: _d.FieldDescriptor):
    """A valid plain-Python value for any field, derived from its descriptor."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return {"0": "1GiB"}
    if field.type == _d.FieldDescriptor.TYPE_ENUM:
        return sorted(enum_short_names(field.enum_type))[0]
    if field.type == _d.FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
        return 0.5
    if field.type == _d.FieldDescriptor.TYPE_STRING:
        return "x"
    return 3


@pytest.mark.parametrize("cls", [llem_pb2.PyTorchConfig, llem_pb2.DecoderConfig, llem_pb2.ModelConfig])
def test_every_field_of_the_config_messages_is_accepted(cls):
    # Walks the descriptors: a field added to the proto is covered without editing this test.
    for field in cls.DESCRIPTOR.fields:
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            value = {}
        else:
            value = _sample(field)
        msg = to_message(cls, {field.name: value})
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            assert dict(getattr(msg, field.name)) == value
        elif field.has_presence:
            assert msg.HasField(field.name), field.name
        else:
            assert getattr(msg, field.name) != 0, field.name


def test_enums_accept_short_full_names_and_numbers():
    m = to_message(
        llem_pb2.PyTorchConfig,
        {
            "attn_implementation": "flash_attention_2",
            "bnb_4bit_quant_type": "NF4",
            "bnb_4bit_compute_dtype": "float16",
            "cache_implementation": "CACHE_IMPLEMENTATION_STATIC",
        },
    )
    assert m.attn_implementation == llem_pb2.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2
    assert m.bnb_4bit_quant_type == llem_pb2.BNB4BIT_QUANT_TYPE_NF4
    assert m.bnb_4bit_compute_dtype == llem_pb2.BNB4BIT_COMPUTE_DTYPE_FLOAT16
    assert m.cache_implementation == llem_pb2.CACHE_IMPLEMENTATION_STATIC
    assert to_message(llem_pb2.ModelConfig, {"precision": "bf16"}).precision == llem_pb2.PRECISION_BF16
    assert to_message(llem_pb2.ModelConfig, {"precision": 2}).precision == llem_pb2.PRECISION_FP16
    # torch dtype names, as older llem YAMLs write them
    assert to_message(llem_pb2.ModelConfig, {"precision": "bfloat16"}).precision == llem_pb2.PRECISION_BF16
    assert to_message(llem_pb2.DecoderConfig, {"preset": "deterministic"}).preset == llem_pb2.DECODER_PRESET_DETERMINISTIC


def test_none_means_unset_and_max_memory_int_keys():
    m = to_message(llem_pb2.PyTorchConfig, {"batch_size": None, "max_memory": {0: "10GiB", "cpu": "30GiB"}})
    assert not m.HasField("batch_size")
    assert dict(m.max_memory) == {"0": "10GiB", "cpu": "30GiB"}


def test_unknown_keys_and_wrong_types_are_all_reported_with_suggestions():
    with pytest.raises(ConfigurationError) as ei:
        to_message(
            llem_pb2.PyTorchConfig,
            {"batch_sise": 2, "use_cache": "yes", "cache_implementation": "statik", "num_beams": 1.5, "zzz": 1},
            "pytorch",
        )
    err = ei.value
    assert isinstance(err, ValueError)
    paths = [p for p, _ in err.problems]
    assert paths == ["pytorch.batch_sise", "pytorch.use_cache", "pytorch.cache_implementation", "pytorch.num_beams", "pytorch.zzz"]
    text = str(err)
    assert "did you mean 'batch_size'" in text
    assert "did you mean 'static'" in text
    assert "expected a bool" in text and "expected an integer" in text
    assert "known keys" in text  # no close match: the valid keys are listed instead


def test_bool_is_not_an_int_and_ranges_are_checked():
    with pytest.raises(ConfigurationError, match="decoder.top_k: expected an integer, got bool"):
        to_message(llem_pb2.DecoderConfig, {"top_k": True}, "decoder")
    with pytest.raises(ConfigurationError, match="out of range"):
        to_message(llem_pb2.PyTorchConfig, {"batch_size": 2**40})
    assert to_message(llem_pb2.DecoderConfig, {"temperature": 1}).temperature == 1.0


def test_generate_request_collects_problems_across_blocks():
    with pytest.raises(ConfigurationError) as ei:
        _core.generate_request(
            ["hi"], model="demo", precision="bf61", pytorch={"batchsize": 2}, decoder={"tempreature": 0.5}, max_output_tokens="8"
        )
    paths = {p for p, _ in ei.value.problems}
    assert paths == {"precision", "pytorch.batchsize", "decoder.tempreature", "max_output_tokens"}
    assert "did you mean 'temperature'" in str(ei.value)


def test_generate_request_built_from_dicts_and_messages():
    req = _core.generate_request(
        "Hello",
        model=llem_pb2.ModelConfig(model="demo"),
        precision="fp32",
        pytorch=llem_pb2.PyTorchConfig(batch_size=2),
        decoder={"preset": "deterministic", "top_k": 5},
        max_output_tokens=4,
        random_seed=7,
    )
    assert list(req.prompts) == ["Hello"]
    assert req.model.model == "demo" and req.model.precision == llem_pb2.PRECISION_FP32
    assert req.model.pytorch.batch_size == 2
    assert req.decoder.top_k == 5 and req.max_output_tokens == 4 and req.random_seed == 7
    assert not req.HasField("max_input_tokens")


def test_load_config_strips_generation_fields_only():
    cfg = _core.model_config("demo", "bf16", {"batch_size": 4, "cache_implementation": "static", "device_map": "cpu"})
    load = _core.load_config(cfg)
    assert load.pytorch.device_map == "cpu"
    assert not load.pytorch.HasField("batch_size") and load.pytorch.cache_implementation == 0


def test_message_to_dict_keeps_presence_and_short_enums():
    e = llem_pb2.Energy(available=True, total_j=3.5, devices=[llem_pb2.DeviceEnergy(index=0, energy_j=3.5)])
    d = message_to_dict(e)
    assert d["total_j"] == 3.5 and "adjusted_j" not in d and d["devices"][0]["index"] == 0
    m = message_to_dict(llem_pb2.ModelInfo(memory_bytes=2**40, config=llem_pb2.ModelConfig(precision=llem_pb2.PRECISION_BF16)))
    assert m["memory_bytes"] == 2**40  # a number, not json_format's string
    assert m["config"]["precision"] == "bf16"


def test_channel_settings_targets_token_and_tls(tmp_path):
    s = _core.channel_settings(None, targets=["127.0.0.1:5001", "127.0.0.1:5002"], token="t0k")
    assert s.target == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert ("authorization", "Bearer t0k") in s.metadata
    assert any(k == "grpc.service_config" and "round_robin" in v for k, v in s.options)
    assert _core.channel_settings("[::1]:1,[::1]:2").target == "ipv6:[::1]:1,[::1]:2"
    dns = _core.channel_settings("dns:///example.invalid:50051")
    assert any(k == "grpc.service_config" for k, _ in dns.options)
    plain = _core.channel_settings("h:1", max_send_message_bytes=10, max_receive_message_bytes=20)
    assert ("grpc.max_send_message_length", 10) in plain.options and ("grpc.max_receive_message_length", 20) in plain.options
    assert plain.credentials is None and not any(k == "grpc.service_config" for k, _ in plain.options)
    with pytest.raises(ConfigurationError, match="cannot read"):
        _core.channel_settings("h:1", root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ConfigurationError, match="both"):
        _core.channel_settings("h:1", certificate_chain=b"-----BEGIN X-----")
    assert _core.channel_settings("h:1", tls=True).credentials is not None


def test_import_stays_light():
    code = (
        "import sys, llem_client, llem_client.convert;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','rich','yaml','numpy')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unavailable_energy_has_no_zero_figures():
    absent = llem_pb2.Energy(available=False, unavailable_reason="no NVIDIA GPU")
    assert message_to_dict(absent) == {"available": False, "unavailable_reason": "no NVIDIA GPU"}
    absent.absence = llem_pb2.ENERGY_ABSENCE_NOT_METERED  # its kind, by name
    assert message_to_dict(absent)["absence"] == "ENERGY_ABSENCE_NOT_METERED"
    absent.absence = 99  # a kind from a newer server: its number, not a crash
    assert message_to_dict(absent)["absence"] == 99
    measured = llem_pb2.Energy(available=True, method="nvml", total_j=2.5, uncertainty_j=0.1,
                               cpu=llem_pb2.CpuEnergy(available=False, unavailable_reason="RAPL not readable"))
    d = message_to_dict(measured)
    assert d["total_j"] == 2.5 and d["uncertainty_j"] == 0.1
    assert d["cpu"] == {"available": False, "unavailable_reason": "RAPL not readable"}
    info = llem_pb2.ModelInfo(load_energy=llem_pb2.Energy(available=False, unavailable_reason="r", method="nvml"))
    assert message_to_dict(info)["load_energy"] == {"available": False, "unavailable_reason": "r", "method": "nvml"}


def test_wheel_ships_the_py_typed_markers(tmp_path):
    import shutil
    import zipfile
    from pathlib import Path

    pytest.importorskip("setuptools")
    src = Path(__file__).resolve().parent.parent / "client"
    # Build from a copy: a build leaves build/ and egg-info behind.
    copy = tmp_path / "client"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(copy)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {p.stderr[-300:]}")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llem_client/py.typed" in names and "llem/py.typed" in names


def test_async_client_has_the_sync_methods_the_readme_says():
    from pathlib import Path

    from llem_client import AsyncClient, AsyncGenerateStream, Client, GenerateStream

    def public(cls) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(Client) - public(AsyncClient) == {"generate_future"}
    assert public(GenerateStream) <= public(AsyncGenerateStream)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "except `generate_future`" in readme and "AsyncClient` has the same methods." not in readme


def test_energy_delivery_accepts_the_cli_and_the_proto_spellings(tmp_path):
    import yaml

    for word in ("response", "in_response", "IN_RESPONSE", "ENERGY_DELIVERY_IN_RESPONSE"):
        req = _core.generate_request("x", model="m", energy_delivery=word)
        assert req.energy_delivery == llem_pb2.ENERGY_DELIVERY_IN_RESPONSE, word
    assert _core.generate_request("x", model="m", energy_delivery="deferred").energy_delivery == llem_pb2.ENERGY_DELIVERY_DEFERRED
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "dataset": {"n": 1, "input_len": 2}}))
    for word in ("response", "in_response", "deferred"):
        p = subprocess.run([sys.executable, "-m", "llem_client.cli", "run", str(cfg), "--energy-delivery", word, "--dry-run"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert p.returncode == 0, (word, p.stderr)


def test_an_address_without_a_port_means_50051():
    for given, dialled in (("127.0.0.1", "127.0.0.1:50051"), ("localhost", "localhost:50051"), ("::1", "[::1]:50051"),
                           ("[::1]", "[::1]:50051"), ("h:7", "h:7"), ("dns:///h:7", "dns:///h:7")):
        assert _core.channel_settings(given).target == dialled, given
    assert _core.channel_settings("127.0.0.1,127.0.0.2:7").replicas == ("127.0.0.1:50051", "127.0.0.2:7")


def test_every_json_flag_has_help():
    from llem_client.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.option_strings:
                assert a.help, f"{name} {a.option_strings} has no help"


def test_a_prompt_with_half_a_character_is_a_configuration_error_naming_it():
    # A lone surrogate cannot be encoded as UTF-8: it raised a bare UnicodeEncodeError.
    from llem_client import _core

    with pytest.raises(ConfigurationError) as ei:
        _core.generate_request(["fine", "cut \ud83d"], model="llama")
    assert [f for f, _ in ei.value.problems] == ["prompts[1]"]
    assert "position 4" in ei.value.problems[0][1]
    # prompts given as a generator are read once, not lost to that check
    assert list(_core.generate_request((p for p in ["a", "b"]), model="llama").prompts) == ["a", "b"]
