"""What an authenticated client (or someone who can write under --model-root) could do to the
server, from a security audit; each test asserts what a user or operator would notice.

* F5: a LoadModel whose max_memory map holds 400,000 bad keys answers one violation at once
  (it froze the front process ~3.5 s building and trimming 400,000 violations);
* F6: a huge prompt is cut by characters before tokenization (a 15.9 MB prompt took the worker
  37 s and 3.3 GB here to keep 512 tokens); normal prompts tokenize exactly as before;
* F7: failed loads do not pile up in ListModels (300 distinct failures left 300 entries);
* F8: weights named by a shard index must stay under the model root, and the worker checks
  the model directory again just before from_pretrained.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llem.v1 import llem_pb2

from _hardening import code_of, field_violations
from conftest import start_server, stop_server

SLOW_SWAP = "slow-swap"  # LLEM_FAULT_SLOW_LOAD: its load waits 2 s in the worker before from_pretrained
H = health_pb2.HealthCheckResponse


def _sharded(src, dst, shard_name: str) -> None:
    """A copy of ``src`` whose weights are named by model.safetensors.index.json only."""
    from safetensors import safe_open

    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (dst / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: shard_name for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def abuse_root(model_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("abuse")
    root = base / "models"
    root.mkdir()
    outside = base / "outside" / "llama"
    shutil.copytree(model_root / "llama", outside)
    for name in ("llama", SLOW_SWAP, "swap"):
        shutil.copytree(model_root / "llama", root / name)
    weights = model_root / "llama" / "model.safetensors"
    # The audit's layout: an index only, naming weights outside the root.
    _sharded(model_root / "llama", root / "index-escape", "../../outside/llama/model.safetensors")
    _sharded(model_root / "llama", root / "index-absolute", str(outside / "model.safetensors"))
    _sharded(model_root / "llama", root / "index-ok", "model-00001-of-00001.safetensors")
    shutil.copy(weights, root / "index-ok" / "model-00001-of-00001.safetensors")
    return root


@pytest.fixture(scope="module")
def abuse(abuse_root, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("abuse-server"), abuse_root, "--max-models", "2",
                       env={"LLEM_FAULT_SLOW_LOAD": SLOW_SWAP, "HF_HUB_OFFLINE": "1"})
    yield srv
    stop_server(srv)


def _load(stub, name: str, timeout: float = 120, **pytorch) -> tuple[grpc.StatusCode, object]:
    req = llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model=name))
    for key, value in pytorch.get("max_memory", {}).items():
        req.model.pytorch.max_memory[key] = value
    if "device_map" in pytorch:
        req.model.pytorch.device_map = pytorch["device_map"]
    return code_of(stub.LoadModel, req, timeout=timeout)


def _health(server, service: str = ""):
    code, resp = code_of(health_pb2_grpc.HealthStub(server.channel()).Check,
                         health_pb2.HealthCheckRequest(service=service), timeout=10)
    return resp.status if code == grpc.StatusCode.OK else code


# -- F5: a huge max_memory map ---------------------------------------------------------------------

def test_a_max_memory_map_of_400000_keys_is_refused_with_one_violation(abuse):
    req = llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model="llama"))
    req.model.pytorch.device_map = "auto"
    req.model.pytorch.max_memory.update({f"k{i:06d}": "1GiB" for i in range(400_000)})
    assert req.ByteSize() > 6_000_000
    code, err = code_of(abuse.stub().LoadModel, req, timeout=120)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    ((field, description),) = field_violations(err)  # not 40 of 400,000 "key ... is not a GPU index"
    assert field == "model.pytorch.max_memory" and "400000 keys" in description and "at most 64" in description
    assert len(err.details()) < 300
    assert _health(abuse) == H.SERVING


def test_violations_stop_being_collected_after_a_hundred(monkeypatch):
    """Whatever produces them, a request's problems are kept up to MAX_VIOLATIONS, then counted."""
    from llem_server import config

    monkeypatch.setattr(config, "MAX_MEMORY_KEYS", 10**9)  # let every key through to be checked one by one
    m = llem_pb2.ModelConfig(model="llama")
    m.pytorch.max_memory.update({f"k{i:06d}": "1GiB" for i in range(400_000)})
    with pytest.raises(config.ConfigError) as raised:
        config.resolve_load(m, config.Capabilities(), model_is_local=True)
    got = raised.value.violations
    assert len(got) == config.MAX_VIOLATIONS + 1
    assert got[-1].field == "…" and got[-1].description.startswith(f"{400_000 - config.MAX_VIOLATIONS} more")
    assert raised.value.status == config.INVALID_ARGUMENT
    assert len(str(raised.value)) < 20_000


def test_dropped_violations_still_decide_the_status():
    from llem_server import config

    col = config._Collector()
    for _ in range(150):
        col.bad("model.pytorch.max_memory", "key '1': needs CUDA", config.FAILED_PRECONDITION)
    col.bad("prompts", "at least one prompt is required")  # an INVALID_ARGUMENT among the dropped
    err = col.error()
    assert err.status == config.INVALID_ARGUMENT and len(err.violations) == config.MAX_VIOLATIONS + 1


def test_an_error_with_400000_violations_builds_only_what_its_trailer_can_hold(monkeypatch):
    from llem_server.errors import _MAX_DETAILS_BYTES, ServiceError

    built: list[int] = []
    build = ServiceError._build

    def counting(self, message, violations):
        built.append(len(violations))
        return build(self, message, violations)

    monkeypatch.setattr(ServiceError, "_build", counting)
    violations = [("model.pytorch.max_memory", f"key 'k{i:06d}' is not a GPU index (0, 1, ...) or 'cpu'")
                  for i in range(400_000)]
    status = ServiceError.invalid_argument(violations, "invalid max_memory").to_rpc_status()
    assert status.ByteSize() <= _MAX_DETAILS_BYTES
    # At most what fits (~60 of these), a few times over for the search: not 400,000 at once.
    assert max(built) <= 200 and sum(built) <= 2_000, built
    from google.rpc import error_details_pb2

    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    kept = len(bad.field_violations) - 1
    assert kept > 10 and bad.field_violations[-1].description == f"{400_000 - kept} more problems not shown"


# -- F6: huge prompts --------------------------------------------------------------------------------

class _PeakRss:
    """Peak resident memory of a process's children (the device worker), sampled every 50 ms."""

    def __init__(self, pid: int):
        self.parent, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.start = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> int:
        total = 0
        for child in self.parent.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.sample())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.sample())


def test_a_huge_prompt_is_cut_before_tokenization(abuse):
    stub = abuse.stub()

    def request(prompt: str) -> llem_pb2.GenerateRequest:
        return llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model="llama"), prompts=[prompt],
                                        max_output_tokens=1, max_input_tokens=32)

    code, _ = code_of(stub.Generate, request("warm up"), timeout=120)
    assert code == grpc.StatusCode.OK  # the model is loaded: what follows is the prompt's cost alone
    prompt = ("The quick brown fox jumps over the lazy dog; energy is measured in joules. " * 110_000)[:8_000_000]
    rss = _PeakRss(abuse.proc.pid)
    code, resp = code_of(stub.Generate, request(prompt), timeout=300)
    grew = rss.stop() - rss.start
    assert code == grpc.StatusCode.OK, resp
    assert resp.completions[0].input_tokens == 32
    # Unfixed, tokenizing all 8 MB raised the worker's memory by ~1.7 GB here (and took ~14 s).
    assert grew < 300 * 2**20, f"the worker grew by {grew / 2**20:.0f} MiB"
    (warning,) = [w.message for w in resp.warnings if w.code == "INPUT_TRUNCATED"]
    assert "prompts[0] (8000000 characters, cut to 512 before tokenization, 32 tokens kept)" in warning


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prompts_cut_by_characters_keep_the_tokens_truncation_keeps(model_root, name, side):
    """Bit-identical tokens: a prompt cut to CHARS_PER_TOKEN * limit characters (on the side that
    truncation keeps) truncates to the same ids as the whole prompt; shorter ones are untouched."""
    from transformers import AutoTokenizer

    from llem_server.demo import _CORPUS
    from llem_server.generation import CHARS_PER_TOKEN, _cut_long_prompts

    tok = AutoTokenizer.from_pretrained(model_root / name)
    tok.padding_side, tok.truncation_side = "left", side
    if tok.pad_token_id is None:  # as load_model does for GPT-2-style tokenizers
        tok.pad_token = tok.eos_token
    limit = 64
    text = " ".join(_CORPUS) * 40  # accents, CJK, emoji, code: several times the room
    normal = text[: limit * CHARS_PER_TOKEN]
    texts, cut = _cut_long_prompts(tok, [text, normal, "Hi"], limit)
    assert cut == {0: len(text)} and texts[1] is normal and texts[2] == "Hi"
    assert len(texts[0]) == limit * CHARS_PER_TOKEN and texts[0] == (text[-len(texts[0]):] if side == "left"
                                                                     else text[: len(texts[0])])
    ours = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit)
    whole = tok([text, normal, "Hi"], return_tensors="pt", padding=True, truncation=True, max_length=limit)
    assert ours["input_ids"].tolist() == whole["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == whole["attention_mask"].tolist()


def test_the_truncation_warning_counts_tokens_without_tokenizing_again(model_root):
    """Counts come from what truncation removed (special tokens included), equal to a full
    tokenization; prompts that fit are not named, nor one exactly at the limit."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from llem_server.generation import _cut_long_prompts, _lengths, _truncation_warning

    tok = AutoTokenizer.from_pretrained(model_root / "llama")
    tok.padding_side = "left"
    tok.backend_tokenizer.post_processor = TemplateProcessing(  # BOS and EOS around every piece
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    limit = 16
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    exact = next(text[:n] for n in range(1, len(text)) if len(tok(text[:n])["input_ids"]) == limit)
    prompts = ["Hi", "hello world " * 15, exact, "energy joules " * 18]
    full = [len(ids) for ids in tok(prompts)["input_ids"]]
    texts, cut = _cut_long_prompts(tok, prompts, limit)
    assert not cut  # all within CHARS_PER_TOKEN * limit characters: counted, not cut
    slices = [(0, tok(texts[:2], return_tensors="pt", padding=True, truncation=True, max_length=limit)),
              (2, tok(texts[2:], return_tensors="pt", padding=True, truncation=True, max_length=limit))]

    class NoSecondPass:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized a second time")

    ((code, message),) = _truncation_warning(NoSecondPass(), texts, slices, _lengths(slices), limit, cut)
    assert code == "INPUT_TRUNCATED" and "max_input_tokens (16)" in message
    assert f"prompts[1] ({full[1]} tokens)" in message and f"prompts[3] ({full[3]} tokens)" in message
    assert "prompts[0]" not in message and "prompts[2]" not in message and message.startswith("2 prompt(s)")
    # Without a fast tokenizer's encodings, prompts at the limit are tokenized again (bounded): same words.
    plain = [(start, dict(enc)) for start, enc in slices]
    assert _truncation_warning(tok, texts, plain, _lengths(plain), limit, cut) == [(code, message)]


# -- F7: failed loads ---------------------------------------------------------------------------------

def test_failed_loads_are_kept_only_for_the_most_recent(abuse):
    from llem_server.registry import MAX_FAILED

    stub = abuse.stub()
    budgets = [str(1000 + i) for i in range(MAX_FAILED + 4)]  # bytes: far too small, each its own config
    for budget in budgets:
        code, _ = _load(stub, "llama", max_memory={"cpu": budget})
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    models = stub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models
    failed = {m.config.pytorch.max_memory.get("cpu"): m for m in models if m.state == llem_pb2.MODEL_STATE_FAILED}
    assert len(failed) == MAX_FAILED
    assert set(failed) == set(budgets[-MAX_FAILED:])  # the oldest went, as an unload would
    assert "got no memory" in failed[budgets[-1]].error
    # They go from the health service too: the operator's checks stop listing them.
    assert _health(abuse, failed[budgets[-1]].config_hash) == H.NOT_SERVING
    gone = llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model="llama"))
    gone.model.pytorch.max_memory["cpu"] = budgets[0]
    from llem_server.config import Capabilities, resolve_load

    load, _ = resolve_load(gone.model, Capabilities(), model_is_local=True)
    assert _health(abuse, load.config_hash()) in (H.SERVICE_UNKNOWN, grpc.StatusCode.NOT_FOUND)


def test_a_failed_entry_that_requests_still_hold_stays_until_released():
    from llem_server.registry import FAILED, MAX_FAILED, Registry

    seen = []
    reg = Registry(on_change=lambda h, s: seen.append((h, s)))
    held = reg.reserve("held", llem_pb2.ModelConfig(model="m"), 0)
    reg.failed(held, "bad")
    for i in range(MAX_FAILED + 3):
        e = reg.reserve(f"h{i}", llem_pb2.ModelConfig(model="m"), 0)
        reg.failed(e, "bad")
        reg.release(e)
    assert reg.get("held") is held and held.state == FAILED  # its request reports to it
    assert [h for h, s in seen if s is None] == ["h0", "h1", "h2"]
    reg.release(held)
    assert reg.get("held") is None and ("held", None) in seen
    assert sum(e.state == FAILED for e in reg.list()) == MAX_FAILED


# -- F8: files outside the model root -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["index-escape", "index-absolute"])
def test_a_shard_index_naming_weights_outside_the_root_is_refused(abuse, name):
    code, err = _load(abuse.stub(), name)
    assert code == grpc.StatusCode.PERMISSION_DENIED, err  # unfixed: loaded from outside, OK
    assert "model.safetensors.index.json names a weight file outside the model root" in err.details()
    assert "outside/llama" not in err.details()  # nothing of the layout outside the root


def test_odd_shard_indexes_are_refused_without_hanging(abuse_root):
    """A FIFO named like an index must not block the front process (it reads indexes on every
    request); an index that is not JSON cannot be checked, so it is refused."""
    from llem_server.paths import ModelPathError, resolve_model

    for name, make in (("index-fifo", os.mkfifo), ("index-garbage", lambda p: open(p, "w").write("{not json"))):
        shutil.copytree(abuse_root / "llama", abuse_root / name)
        make(str(abuse_root / name / "model.safetensors.index.json"))
        outcome = []
        worker = threading.Thread(target=lambda: outcome.append(_raises(resolve_model, name, abuse_root, False)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert outcome, f"{name}: resolve_model hung"
        assert isinstance(outcome[0], ModelPathError) and outcome[0].status == "FAILED_PRECONDITION", outcome


def _raises(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


def test_a_shard_index_inside_the_directory_still_loads(abuse):
    code, resp = _load(abuse.stub(), "index-ok")
    assert code == grpc.StatusCode.OK, resp


def test_an_index_rewritten_to_point_outside_is_refused_at_once(abuse_root):
    """Indexes are parsed once per file version (not on every request): a rewrite is a new
    version, so the next check sees it."""
    from llem_server.paths import ModelPathError, resolve_model

    _sharded(abuse_root / "llama", abuse_root / "index-rewritten", "model-00001.safetensors")
    shutil.copy(abuse_root / "llama" / "model.safetensors", abuse_root / "index-rewritten" / "model-00001.safetensors")
    resolve_model("index-rewritten", abuse_root, False)  # fine, and now known
    index = abuse_root / "index-rewritten" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "../../outside/llama/model.safetensors" for k in data["weight_map"]}
    index.write_text(json.dumps(data))
    err = _raises(resolve_model, "index-rewritten", abuse_root, False)
    assert isinstance(err, ModelPathError) and err.status == "PERMISSION_DENIED", err


def test_the_worker_checks_the_directory_again_before_loading(abuse_root):
    """Files swapped after the front's check (a weight file turned into a link out of the root,
    or a shard index added) are refused by the load itself."""
    from llem_server.models import LoadError, load_model
    from llem_server.paths import resolve_model

    model = resolve_model("swap", abuse_root, allow_hub=False)
    assert model.root == os.path.realpath(abuse_root)
    weights = abuse_root / "swap" / "model.safetensors"
    kwargs = {"dtype": "fp32", "device_map": "cpu"}
    try:
        weights.rename(weights.with_suffix(".bak"))
        weights.symlink_to(abuse_root.parent / "outside" / "llama" / "model.safetensors")
        with pytest.raises(LoadError) as raised:
            load_model("h", model.source, kwargs, None, model_root=model.root)
        assert raised.value.status == "PERMISSION_DENIED" and "links outside the model root" in raised.value.message
        weights.unlink()
        index = {"metadata": {}, "weight_map": {"lm_head.weight": "../../outside/llama/model.safetensors"}}
        (abuse_root / "swap" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(LoadError) as raised:
            load_model("h", model.source, kwargs, None, model_root=model.root)
        assert raised.value.status == "PERMISSION_DENIED" and "names a weight file" in raised.value.message
    finally:
        (abuse_root / "swap" / "model.safetensors.index.json").unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        weights.with_suffix(".bak").rename(weights)
    load_model("h", model.source, kwargs, None, model_root=model.root)  # as it was: loads


def test_a_weight_file_swapped_while_the_load_waits_is_refused(abuse, abuse_root):
    """End to end: the front checks the directory, the load waits in the worker (test hook: 2 s),
    and meanwhile the weights become a link out of the root."""
    stub = abuse.stub()
    weights = abuse_root / SLOW_SWAP / "model.safetensors"
    call = stub.LoadModel.future(llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model=SLOW_SWAP)), timeout=120)
    try:
        deadline = time.monotonic() + 30
        while not any(m.config.model == SLOW_SWAP  # listed: the front's checks passed, the worker has it
                      for m in stub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        weights.rename(weights.with_suffix(".bak"))
        weights.symlink_to(abuse_root.parent / "outside" / "llama" / "model.safetensors")
        code, err = code_of(call.result)
    finally:
        weights.unlink(missing_ok=True)
        if weights.with_suffix(".bak").exists():
            weights.with_suffix(".bak").rename(weights)
    assert code == grpc.StatusCode.PERMISSION_DENIED, err  # without the check: loaded from outside
    assert "links outside the model root" in err.details()
