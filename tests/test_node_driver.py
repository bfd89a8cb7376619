"""The contract driven from another language: examples/node/driver.mjs (Node, @grpc/grpc-js,
the proto loaded at run time) against the session server, compared with the Python client.

Skipped only where ``node`` is not installed; with node but without the driver's packages it
fails, saying how to install them (buildscripts/test.sh does it).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from llem_client import Client

from conftest import ROOT

NODE = shutil.which("node")
if NODE is None:
    pytest.skip("node is not on PATH: the Node driver example cannot run", allow_module_level=True)

DRIVER = ROOT / "examples" / "node" / "driver.mjs"
PROMPTS = ["The energy of a GPU", "Hello"]
MAX_OUT = 8
# What driver.mjs sends, as the Python client spells it.
SAME_CONFIG = dict(model="llama", pytorch={"batch_size": 2}, decoder={"do_sample": False},
                   max_output_tokens=MAX_OUT, random_seed=1234)


def run_driver(address: str, model: str = "llama") -> subprocess.CompletedProcess:
    if not (ROOT / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node/node_modules is missing: run `npm ci --prefix examples/node` "
                    "(or bash buildscripts/test.sh, which installs it)")
    args = [NODE, str(DRIVER), "--server", address, "--model", model, "--max-output-tokens", str(MAX_OUT)]
    for p in PROMPTS:
        args += ["--prompt", p]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def steps(server) -> dict[str, list[dict]]:
    """The driver's JSON lines, grouped by their "step"."""
    out = run_driver(server.address)
    assert out.returncode == 0, f"driver failed ({out.returncode}):\n{out.stderr}\n{out.stdout}"
    grouped: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        obj = json.loads(line)
        grouped.setdefault(obj["step"], []).append(obj)
    return grouped


def test_driver_runs_to_the_end(steps):
    assert steps["done"] == [{"step": "done", "ok": True}]
    assert len(steps["generate"]) == 2


def test_health_and_server_info(steps):
    assert steps["health"][0]["status"] == "SERVING"
    info = steps["server_info"][0]
    assert info["server_version"]
    assert info["limits"]["max_message_bytes"] == str(int(info["limits"]["max_message_bytes"]))  # int64 as text
    assert [d["kind"] for d in info["devices"]] == ["cpu"]


def test_greedy_generate_is_repeatable_and_cached(steps):
    first, second = steps["generate"]
    for r in (first, second):
        assert [c["index"] for c in r["completions"]] == [0, 1]
        for c in r["completions"]:
            assert c["text"] and c["token_ids"], c
            assert c["output_tokens"] == len(c["token_ids"]) <= MAX_OUT
            assert c["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
        assert r["usage"]["output_tokens"] == sum(c["output_tokens"] for c in r["completions"])
        assert r["random_seed"] == "1234"  # int64 echoed exactly (as a string, longs: String)
        # do_sample=false is proto3's zero, yet it arrived: presence travelled from Node.
        assert r["generate_kwargs"]["do_sample"] == "false"
    assert second["completions"] == first["completions"]
    assert second["config_hash"] == first["config_hash"] and len(first["config_hash"]) == 64
    assert second["cache_hit"] is True  # the first call may or may not have loaded it (shared server)


def test_same_answer_as_the_python_client(server, steps):
    node = steps["generate"][1]
    with Client(server.address, timeout=120) as c:
        r = c.generate(PROMPTS, **SAME_CONFIG)
    assert r.config_hash == node["config_hash"]
    assert r.cache_hit
    assert [x.text for x in r.completions] == [x["text"] for x in node["completions"]]
    assert [list(x.token_ids) for x in r.completions] == [x["token_ids"] for x in node["completions"]]


def test_energy_absent_with_a_reason_never_zero(steps):
    for r in steps["generate"] + [steps["stream"][0]["final"]]:
        e = r["energy"]
        assert e["available"] is False
        assert e["unavailable_reason"].strip()
        assert "total_j" not in e


def test_invalid_request_names_the_field(steps):
    bad = steps["invalid_argument"][0]
    assert bad["code"] == 3 and bad["code_name"] == "INVALID_ARGUMENT"
    assert sorted(bad["detail_types"]) == ["google.rpc.BadRequest", "google.rpc.ErrorInfo"]
    assert (bad.get("reason"), bad.get("domain")) == ("INVALID_REQUEST", "llem.v1"), bad
    fields = [v["field"] for v in bad["field_violations"]]
    assert fields == ["decoder.temperature"], bad
    assert bad["field_violations"][0]["description"]


def test_stream_matches_generate(steps):
    s = steps["stream"][0]
    unary = steps["generate"][0]
    assert s["totals_match"] is True and s["same_text_as_generate"] is True
    assert s["text"] == [c["text"] for c in unary["completions"]]
    assert s["chunks"] >= 1 and s["streamed_tokens"] == s["final"]["usage"]["output_tokens"]
    assert s["final"]["completions"] == unary["completions"]
    assert s["final"]["config_hash"] == unary["config_hash"]


def test_driver_fails_loudly(server):
    out = run_driver(server.address, model="no-such-model")
    assert out.returncode == 1
    assert "FAILED: NOT_FOUND" in out.stderr, out.stderr
    assert '"step":"done"' not in out.stdout
