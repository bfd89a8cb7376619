"""Experiment YAML parsing, prompts and result aggregation of llem-client (no server)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from llem.v1 import llem_pb2
from llem_client import ConfigurationError
from llem_client.datasets import Prompt, load_prompts, order_prompts, synthetic_prompts
from llem_client.experiment import EXPERIMENT_KEYS, build_experiment
from llem_client.results import aggregate, percentile, request_record, write_atomic

BASE = {"model": "llama", "dataset": {"n": 4, "input_len": 8}}


def test_every_documented_key_is_accepted(tmp_path):
    data = {
        "model": "llama",
        "backend": "pytorch",
        "n": 3,
        "dataset": {"n": 5, "input_len": 16, "output_len": 4, "seed": 1},
        "dataset_order": "shuffled",
        "precision": "fp32",
        "random_seed": 7,
        "max_input_tokens": 64,
        "max_output_tokens": 4,
        "decoder": {"preset": "deterministic", "top_k": 5},
        "pytorch": {"batch_size": 2, "attn_implementation": "sdpa", "max_memory": {0: "1GiB"}},
        "warmup": {"enabled": True, "n_warmup": 1, "thermal_floor_seconds": 0, "convergence_detection": True,
                   "cv_threshold": 0.2, "max_prompts": 4, "window_size": 2, "min_prompts": 2},
        "baseline": {"enabled": True, "duration_seconds": 1},
        "energy": {"backend": "nvml"},
        "output_dir": str(tmp_path),
    }
    assert set(data) == set(EXPERIMENT_KEYS)
    exp = build_experiment(data)
    assert exp.batch_size == 2 and exp.max_output_tokens == 4 and exp.energy_backend == "nvml"
    req = exp.request(["a", "b"], "r1")
    assert req.model.precision == llem_pb2.PRECISION_FP32 and req.model.pytorch.batch_size == 2
    assert req.decoder.top_k == 5 and req.max_input_tokens == 64 and req.random_seed == 7 and req.request_id == "r1"
    eff = exp.effective()
    assert eff["pytorch"]["max_memory"] == {"0": "1GiB"} and eff["warmup"]["window_size"] == 2
    json.dumps(eff)  # JSON-able


def test_all_problems_in_one_error_with_suggestions():
    data = {
        "model": "llama", "backend": "vllm", "datset": "x.jsonl", "dataset": {"n": 2, "inputlen": 3},
        "warmup": {"n_warmpu": 2}, "baseline": {"duration": 3}, "energy": {"backend": "nvlm"},
        "pytorch": {"batch_sise": 2}, "decoder": {"temprature": 1}, "dataset_order": "interleave",
    }
    with pytest.raises(ConfigurationError) as ei:
        build_experiment(data)
    paths = {p for p, _ in ei.value.problems}
    assert {"datset", "backend", "dataset.inputlen", "warmup.n_warmpu", "baseline.duration", "energy.backend",
            "pytorch.batch_sise", "decoder.temprature", "dataset_order"} <= paths
    text = str(ei.value)
    for hint in ("'dataset'", "'input_len'", "'n_warmup'", "'duration_seconds'", "'nvml'", "'batch_size'", "'temperature'", "'interleaved'"):
        assert f"did you mean {hint}" in text, hint


def test_overrides_and_flags():
    exp = build_experiment(
        BASE,
        overrides=["pytorch.batch_size=3", "decoder.preset=deterministic", "warmup.enabled=false", "energy.backend=null"],
        flags={"n": 2, "precision": "bf16", "model": "gpt2", "output_dir": None},
    )
    assert exp.batch_size == 3 and exp.n == 2 and exp.model == "gpt2" and not exp.warmup["enabled"]
    assert exp.energy_backend == "null"
    assert exp.model_config.precision == llem_pb2.PRECISION_BF16
    with pytest.raises(ConfigurationError, match="not a block"):
        build_experiment({**BASE, "dataset": "p.txt"}, overrides=["dataset.n=3"])
    with pytest.raises(ConfigurationError, match="KEY=VALUE"):
        build_experiment(BASE, overrides=["pytorch.batch_size"])


def test_a_top_level_null_means_unset_as_inside_blocks():
    nulls = {k: None for k in ("backend", "dataset_order", "output_dir", "energy", "warmup", "random_seed", "decoder")}
    exp = build_experiment({**BASE, **nulls})
    default = build_experiment(BASE)
    assert (exp.dataset_order, exp.output_dir, exp.energy_backend, exp.random_seed) == \
        (default.dataset_order, default.output_dir, default.energy_backend, default.random_seed)
    with pytest.raises(ConfigurationError, match="model"):
        build_experiment({**BASE, "model": None})


def test_output_len_and_max_output_tokens_must_agree():
    with pytest.raises(ConfigurationError, match="conflicts with max_output_tokens"):
        build_experiment({**BASE, "dataset": {"n": 2, "output_len": 4}, "max_output_tokens": 8})
    assert build_experiment({**BASE, "dataset": {"n": 2, "output_len": 8}, "max_output_tokens": 8}).max_output_tokens == 8


def test_synthetic_prompts_are_reproducible():
    a = synthetic_prompts(3, 20, seed=5)
    assert a == synthetic_prompts(3, 20, seed=5) and a != synthetic_prompts(3, 20, seed=6)
    assert all(len(p.text.split()) == 20 for p in a)


def test_dataset_orders():
    ps = [Prompt("a1", "a"), Prompt("a2", "a"), Prompt("b1", "b"), Prompt("a3", "a"), Prompt("c1", "c")]
    assert [p.text for p in order_prompts(ps, "interleaved", 0)] == ["a1", "b1", "c1", "a2", "a3"]
    assert [p.text for p in order_prompts(ps, "grouped", 0)] == ["a1", "a2", "a3", "b1", "c1"]
    s1 = [p.text for p in order_prompts(ps, "shuffled", 1)]
    assert s1 == [p.text for p in order_prompts(ps, "shuffled", 1)] and sorted(s1) == sorted(p.text for p in ps)


def test_files_and_n(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x1", "source": "x"}\n{"text": "y1", "source": "y"}\n\n{"prompt": "x2", "source": "x"}\n')
    exp = build_experiment({"model": "m", "dataset": str(jl), "n": 2})
    prompts, info = load_prompts(exp)
    assert [p.text for p in prompts] == ["x1", "y1"] and info["kind"] == "jsonl" and info["available"] == 3
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\nthree\n")
    prompts, info = load_prompts(build_experiment({"model": "m", "dataset": str(txt)}))
    assert [p.text for p in prompts] == ["one", "two", "three"]
    assert "sources" not in info  # a .txt has none
    with pytest.raises(ConfigurationError, match="has 3: set n to at most 3"):
        load_prompts(build_experiment({"model": "m", "dataset": str(txt), "n": 9}))
    # lines without a source are counted too: the counts add up to "used"
    mixed = tmp_path / "m.jsonl"
    mixed.write_text('{"prompt": "x1", "source": "x"}\n{"prompt": "none"}\n{"prompt": "y1", "source": "y"}\n')
    _, info = load_prompts(build_experiment({"model": "m", "dataset": str(mixed)}))
    assert info["sources"] == {"x": 1, "(no source)": 1, "y": 1} and sum(info["sources"].values()) == info["used"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\nnot json\n')
    with pytest.raises(ConfigurationError) as ei:
        load_prompts(build_experiment({"model": "m", "dataset": str(bad)}))
    assert [p for p, _ in ei.value.problems] == [f"{bad}:2", f"{bad}:3"]
    with pytest.raises(ConfigurationError, match="no such file"):
        load_prompts(build_experiment({"model": "m", "dataset": str(tmp_path / "missing.txt")}))


def _resp(out_tokens: int, energy: llem_pb2.Energy | None, ttft: float | None = None) -> llem_pb2.GenerateResponse:
    r = llem_pb2.GenerateResponse(usage=llem_pb2.Usage(input_tokens=10, output_tokens=out_tokens))
    if energy is not None:
        r.energy.CopyFrom(energy)
    if ttft is not None:
        r.timing.time_to_first_token_ms = ttft
    return r


def test_aggregate_never_counts_missing_energy_as_zero():
    recs = [
        request_record(0, [0], _resp(8, llem_pb2.Energy(available=True, total_j=4.0, adjusted_j=1.0), ttft=5.0), 0.5, record_energy=True),
        request_record(1, [1], _resp(8, llem_pb2.Energy(available=False, unavailable_reason="no GPU")), 0.5, record_energy=True),
        request_record(2, [2], _resp(4, llem_pb2.Energy(available=True, total_j=2.0)), 1.0, record_energy=True),
    ]
    a = aggregate(recs, energy_recorded=True)
    assert a["output_tokens"] == 20 and a["input_tokens"] == 30
    assert a["output_tokens_per_s"] == pytest.approx(20 / 2.0)
    e = a["energy"]
    assert e["total_j"] == 6.0 and e["requests_with_energy"] == 2 and e["requests_without_energy"] == 1
    assert e["joules_per_output_token"] == pytest.approx(6.0 / 12)  # only tokens of requests with energy
    assert e["adjusted_j"] is None  # one of the two lacks a baseline: no partial sum
    assert e["unavailable_reasons"] == {"no GPU": 1}
    assert a["time_to_first_token_ms"]["count"] == 1 and a["warnings"]["ENERGY_MISSING"] == 1
    none = aggregate(recs[1:2], energy_recorded=True)["energy"]
    assert none["total_j"] is None and none["joules_per_output_token"] is None
    off = aggregate([request_record(0, [0], _resp(1, None), 0.1, record_energy=False)], energy_recorded=False)
    assert off["energy"] == {"recorded": False, "reason": "energy.backend is null"}


def test_percentile_and_atomic_write(tmp_path):
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None and percentile([7], 99) == 7
    p = write_atomic(tmp_path / "sub" / "r.json", {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_relative_dataset_path_is_found_beside_the_config_or_here_never_guessed(tmp_path, monkeypatch):
    cfg_dir, cwd = tmp_path / "cfg", tmp_path / "cwd"
    cfg_dir.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    source = str(cfg_dir / "exp.yaml")
    (cfg_dir / "p.txt").write_text("beside the config\n")
    prompts, info = load_prompts(build_experiment({"model": "m", "dataset": "p.txt"}, source=source))
    assert [p.text for p in prompts] == ["beside the config"]
    assert info["path"] == str((cfg_dir / "p.txt").resolve()) and info["found_in"] == "config folder"
    (cwd / "q.txt").write_text("here\n")
    prompts, info = load_prompts(build_experiment({"model": "m", "dataset": "q.txt"}, source=source))
    assert [p.text for p in prompts] == ["here"] and info["found_in"] == "current directory"
    # the same name in both places, different files: an error naming both, not a silent pick
    (cwd / "p.txt").write_text("here too\n")
    with pytest.raises(ConfigurationError) as ei:
        load_prompts(build_experiment({"model": "m", "dataset": "p.txt"}, source=source))
    text = str(ei.value)
    assert str(cfg_dir / "p.txt") in text and str(cwd / "p.txt") in text
    with pytest.raises(ConfigurationError, match="no such file"):
        load_prompts(build_experiment({"model": "m", "dataset": "none.txt"}, source=source))


def test_summary_names_the_dataset_file():
    from llem_client.results import summary_rows

    result = {"status": "completed", "config": {"model": "m"}, "config_hash": None, "warnings": [],
              "dataset": {"kind": "txt", "path": "/data/p.txt", "found_in": "config folder", "available": 3, "used": 2},
              "aggregates": aggregate([], energy_recorded=False)}
    assert dict(summary_rows(result))["dataset"] == "/data/p.txt (2 of 3 prompts, found in the config folder)"


def _summary(records: list, **extra) -> dict:
    from llem_client.results import summary_rows

    result = {"status": "completed", "config": {"model": "m"}, "config_hash": None, "warnings": [], "dataset": {},
              "aggregates": aggregate(records, energy_recorded=True), **extra}
    return dict(summary_rows(result))


def test_summary_shows_the_energy_bound_low_confidence_and_no_negative_zero():
    e1 = llem_pb2.Energy(available=True, total_j=2.0, uncertainty_j=0.25, low_confidence=True, adjusted_j=-0.00001,
                         adjusted_uncertainty_j=0.5)
    e2 = llem_pb2.Energy(available=True, total_j=3.0, uncertainty_j=0.5, adjusted_j=0.0, adjusted_uncertainty_j=1.0)
    recs = [request_record(i, [i], _resp(4, e), 0.1, record_energy=True) for i, e in enumerate((e1, e2))]
    rows = _summary(recs)
    # the sums of per-request bounds are worst-case bounds, and the summary says so
    assert rows["total energy"] == "5.000 J ± 0.750 J bound"
    assert rows["low-confidence requests"].startswith("1 of 2")
    assert rows["adjusted energy"] == "0.000 J ± 1.500 J bound"  # the baseline's bound travels with it
    older = llem_pb2.Energy(available=True, total_j=3.0, uncertainty_j=0.5, adjusted_j=1.0)  # a server without the field
    recs = [request_record(i, [i], _resp(4, e), 0.1, record_energy=True) for i, e in enumerate((e1, older))]
    assert _summary(recs)["adjusted energy"] == "1.000 J"  # no bound shown, rather than a made-up ± 0


def test_summary_of_a_run_stopped_before_measuring_says_so():
    rows = _summary([], status="interrupted")
    assert rows["total energy"] == "n/a: no measured requests"


def test_every_bad_scalar_is_reported_and_model_type_is_named():
    with pytest.raises(ConfigurationError) as ei:
        build_experiment({**BASE, "random_seed": 1.5, "max_input_tokens": 0, "max_output_tokens": -3})
    paths = [p for p, _ in ei.value.problems]
    assert {"random_seed", "max_input_tokens", "max_output_tokens"} <= set(paths), ei.value.problems
    for bad in (123, ["demo"]):
        with pytest.raises(ConfigurationError) as ei:
            build_experiment({**BASE, "model": bad})
        msg = dict(ei.value.problems)["model"]
        assert msg.startswith("expected a string") and "required" not in msg


def test_warmup_max_prompts_below_min_prompts_is_rejected():
    warm = {"convergence_detection": True, "min_prompts": 8, "max_prompts": 4}
    with pytest.raises(ConfigurationError) as ei:
        build_experiment({**BASE, "warmup": warm})
    msg = dict(ei.value.problems)["warmup.max_prompts"]
    assert "warmup.min_prompts (8)" in msg
    build_experiment({**BASE, "warmup": {**warm, "convergence_detection": False}})  # unused without convergence


def test_yaml_syntax_error_names_the_file(tmp_path):
    from llem_client.experiment import read_yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigurationError) as ei:
        read_yaml(bad)
    assert f'in "{bad}", line' in str(ei.value) and "<unicode string>" not in str(ei.value)


# --- what the result file needs for publication (audit of llem-client run's files) ---


def test_prompts_keep_their_place_in_the_dataset_and_the_shuffle_seed_is_recorded(tmp_path):
    jl = tmp_path / "p.jsonl"
    lines = ['{"prompt": "a1", "source": "a"}', '{"prompt": "a2", "source": "a"}', "",
             '{"prompt": "b1", "source": "b"}', '{"prompt": "a3", "source": "a"}']
    jl.write_text("\n".join(lines) + "\n")
    prompts, info = load_prompts(build_experiment({"model": "m", "dataset": str(jl), "n": 3}))
    # interleaved a1 b1 a2: their 1-based line numbers, the blank line 3 counted
    assert [(p.text, p.position) for p in prompts] == [("a1", 1), ("b1", 4), ("a2", 2)]
    assert info["positions"] == "1-based line number in the file"
    for p in prompts:  # the file alone gives each prompt back
        assert json.loads(lines[p.position - 1])["prompt"] == p.text
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert [(p.text, p.position) for p in load_prompts(build_experiment({"model": "m", "dataset": str(txt)}))[0]] == \
        [("one", 1), ("two", 3)]
    # synthetic, shuffled without random_seed: positions index the generated list, and the
    # seed the shuffle used (the default) is in the dataset block
    syn = {"model": "m", "dataset": {"n": 6, "input_len": 4, "seed": 1}, "dataset_order": "shuffled"}
    prompts, info = load_prompts(build_experiment(syn))
    generated = synthetic_prompts(6, 4, seed=1)
    assert [generated[p.position].text for p in prompts] == [p.text for p in prompts]
    assert sorted(p.position for p in prompts) == list(range(6))
    assert info["shuffle_seed"] == 42 and info["shuffle_seed_from"].startswith("default")
    info7 = load_prompts(build_experiment({**syn, "random_seed": 7}))[1]
    assert info7["shuffle_seed"] == 7 and info7["shuffle_seed_from"] == "random_seed"
    assert "shuffle_seed" not in load_prompts(build_experiment({**syn, "dataset_order": "grouped"}))[1]
    rec = request_record(0, [0, 1], _resp(2, None), 0.1, record_energy=False,
                         dataset_positions=[prompts[0].position, prompts[1].position])
    assert rec["prompt_indices"] == [0, 1] and rec["dataset_positions"] == [prompts[0].position, prompts[1].position]


def test_config_digest_ignores_output_dir_only():
    a = build_experiment({**BASE, "output_dir": "/results/a"})
    b = build_experiment({**BASE, "output_dir": "elsewhere"})
    assert a.config_digest() == b.config_digest()  # repeats written to different folders group together
    assert a.config_digest() != build_experiment({**BASE, "pytorch": {"batch_size": 2}}).config_digest()
    assert a.effective()["output_dir"] == "/results/a"  # still in the file's config


def test_result_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_atomic(tmp_path / "r.json", {"a": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # as open() would make it, not mkstemp's 0600
        os.umask(0o027)
        assert stat.S_IMODE(write_atomic(tmp_path / "s.json", {"a": 1}).stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_absent_figures_stay_absent_in_the_aggregates():
    empty = aggregate([], energy_recorded=True)
    assert empty["wall_time_s"] is None and empty["output_tokens_per_s"] is None  # nothing timed is not 0 s
    e1 = llem_pb2.Energy(available=True, total_j=2.0, uncertainty_j=0.25)
    e2 = llem_pb2.Energy(available=True, total_j=3.0)  # a server that sent no bound
    recs = [request_record(i, [i], _resp(4, e), 0.1, record_energy=True) for i, e in enumerate((e1, e2))]
    del recs[1]["timing"]["energy_wait_ms"]  # a record from a server without the field
    recs[0]["timing"]["energy_wait_ms"] = 100.0
    a = aggregate(recs, energy_recorded=True)
    assert a["energy"]["total_j"] == 5.0 and a["energy"]["uncertainty_j"] is None  # not 0.25: one bound is unknown
    assert a["server_energy_wait_ms"]["count"] == 1 and a["server_energy_wait_ms"]["p50"] == 100.0
    del recs[1]["timing"]["generate_ms"]
    assert aggregate(recs, energy_recorded=True)["output_tokens_per_generate_s"] is None


def test_energy_bases_say_what_is_and_is_not_counted():
    e = llem_pb2.Energy(available=True, total_j=2.0, uncertainty_j=0.25)
    agg = aggregate([request_record(0, [0], _resp(4, e), 0.1, record_energy=True)], energy_recorded=True)["energy"]
    assert "generate() window" in agg["joules_per_output_token_basis"]
    assert "between requests" in agg["joules_per_output_token_basis"] and "not included" in agg["joules_per_output_token_basis"]
    assert "worst-case bound" in agg["uncertainty_basis"] and "sum" in agg["uncertainty_basis"]


def test_summary_server_latency_names_the_energy_counter_wait():
    recs = []
    for i, wait in enumerate((80.0, 120.0)):
        r = _resp(4, None)
        r.timing.total_ms, r.timing.queue_wait_ms, r.timing.energy_wait_ms = 200.0, 10.0, wait
        recs.append(request_record(i, [i], r, 0.2, record_energy=False))
    row = _summary(recs)["server latency p50 / p90 / p99"]
    assert row.startswith("190.00 / ") and "energy-counter wait p50 100.00 ms" in row, row


def test_summary_says_whose_baseline_adjusted_energy_used():
    e = llem_pb2.Energy(available=True, total_j=2.0, adjusted_j=1.0, baseline_power_w=150.0)
    recs = [request_record(0, [0], _resp(4, e), 0.1, record_energy=True)]
    result = {"status": "completed", "config": {"model": "m"}, "config_hash": None, "warnings": [], "dataset": {},
              "aggregates": aggregate(recs, energy_recorded=True)}
    result["aggregates"]["energy"]["baseline"] = {
        "source": "already on the server, not measured by this run", "request_baseline_power_w": [150.0],
        "devices": [{"index": 0, "power_w": 150.0, "age_s_at_run_start": 600.0}], "matches_requests": True}
    from llem_client.results import summary_rows

    row = dict(summary_rows(result))["adjusted energy"]
    assert row == "1.000 J (baseline 150.0 W, already on the server, not measured by this run, 600 s old at the start)"
