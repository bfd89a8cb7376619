"""``llem-client info|models|load|unload|health`` as subprocesses against a real llem-server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

MODEL = "gpt2"  # a different model than test_cli_run's, so unload does not disturb it


def llem(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LLEM_SERVER", "LLEM_TOKEN")}
    return subprocess.run([sys.executable, "-m", "llem_client.cli", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_health_and_info(server, tmp_path):
    p = llem("health", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "SERVING", p.stderr
    from llem_client import Client

    with Client(server.address, timeout=120) as c:
        key = c.generate(["Hi"], model=MODEL, max_output_tokens=1).config_hash
    p = llem("info", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "server version" in p.stdout and "device" in p.stdout
    assert any(line.split()[:1] == ["loaded"] and key[:12] in line for line in p.stdout.splitlines()), p.stdout
    for line in p.stdout.splitlines()[1:]:  # every row has a value (no bare "cuda" row on a CPU server)
        assert len(line.split(None, 1)) == 2 or ":" in line, line
    p = llem("info", "--server", server.address, "--json", cwd=tmp_path)
    info = json.loads(p.stdout)
    assert info["server_version"] and info["devices"]


def test_info_into_a_closed_pipe_stops_quietly(server, tmp_path):
    # `llem-client info | head -2`: the reader is gone before the output is written.
    env = {k: v for k, v in os.environ.items() if k not in ("LLEM_SERVER", "LLEM_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "llem_client.cli", "info", "--server", server.address],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the CLI has imported grpc and asked the server
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_load_models_unload_roundtrip(server, tmp_path):
    p = llem("load", MODEL, "--server", server.address, "--precision", "fp32", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    loaded = json.loads(p.stdout)
    h = loaded["config_hash"]
    assert len(h) == 64 and loaded["model"]["state"] == "ready"

    # the same load config from an experiment YAML (generation fields are dropped) hits the cache
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"model": MODEL, "precision": "fp32", "pytorch": {"batch_size": 4}, "dataset": "x.txt"}))
    p = llem("load", cfg, "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(h) and "already loaded" in p.stdout

    p = llem("models", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0 and h[:12] in p.stdout and MODEL in p.stdout, p.stdout + p.stderr
    listed = json.loads(llem("models", "--server", server.address, "--json", cwd=tmp_path).stdout)
    assert h in [m["config_hash"] for m in listed["models"]]

    p = llem("unload", h[:12], "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0 and f"unloaded {h}" in p.stdout, p.stdout + p.stderr
    listed = json.loads(llem("models", "--server", server.address, "--json", cwd=tmp_path).stdout)
    assert h not in [m["config_hash"] for m in listed.get("models", [])]
    p = llem("unload", h[:12], "--server", server.address, cwd=tmp_path)
    assert p.returncode == 1 and "match" in p.stderr


def test_load_errors(server, tmp_path):
    p = llem("load", "no-such-model", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 1 and "NOT_FOUND" in p.stderr, p.stderr
    p = llem("load", MODEL, "pytorch.attn_implementaton=eager", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 2 and "did you mean 'attn_implementation'" in p.stderr


def test_commands_against_unreachable_server(tmp_path):
    for cmd in (["info"], ["models"], ["health"], ["load", MODEL], ["unload", "abc"]):
        p = llem(*cmd, "--server", "127.0.0.1:1", cwd=tmp_path, timeout=60)
        assert p.returncode == 1, cmd
        assert "cannot reach llem-server at 127.0.0.1:1" in p.stderr and "Traceback" not in p.stderr


def test_unload_refuses_an_empty_hash_or_prefix(server, tmp_path):
    from llem_client import Client, ConfigurationError

    p = llem("load", MODEL, "--server", server.address, "--precision", "fp32", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    h = json.loads(p.stdout)["config_hash"]
    for blank in ("", "  "):
        p = llem("unload", blank, "--server", server.address, cwd=tmp_path)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "config_hash: empty" in p.stderr and "unloaded" not in p.stdout
    listed = json.loads(llem("models", "--server", server.address, "--json", cwd=tmp_path).stdout)
    assert h in [m["config_hash"] for m in listed["models"]]  # still loaded
    with Client(server.address) as c:
        try:
            c.unload_model("")
        except ConfigurationError:
            pass
        else:
            raise AssertionError("unload_model('') was sent")


def test_health_of_an_unknown_service_says_so(server, tmp_path):
    p = llem("health", "--service", "nope", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 1
    assert "no health status for service 'nope'" in p.stderr, p.stderr


def test_refused_remote_code_is_said_once(server, tmp_path):
    p = llem("load", MODEL, "pytorch.trust_remote_code=true", "--server", server.address, cwd=tmp_path)
    assert p.returncode == 1 and "PERMISSION_DENIED" in p.stderr, p.stderr
    assert p.stderr.count("trust_remote_code is refused") == 1, p.stderr
