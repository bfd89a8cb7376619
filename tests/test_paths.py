"""paths.resolve_model: local-first resolution, escapes refused, hub only when allowed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llem_server.paths import ModelPathError, ResolvedModel, resolve_model


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """<tmp>/models (the root) with models, plus a model and a secret outside it."""
    root = tmp_path / "models"
    root.mkdir()
    _model(root / "tiny")
    _model(root / "org" / "nested")
    (root / "empty").mkdir()
    (root / "afile").write_text("x")
    outside = _model(tmp_path / "outside")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(outside, root / "escape")  # a link out of the root
    os.symlink(root / "tiny", root / "alias")  # a link that stays inside
    bad = _model(root / "badlink")
    os.symlink(tmp_path / "secret.txt", bad / "model.safetensors")  # a weight file linking out
    os.symlink(tmp_path / "models-evil", root / "prefix")  # same prefix, different dir
    _model(tmp_path / "models-evil")
    return {"root": root, "outside": outside, "tmp": tmp_path}


def _err(name, root, allow_hub=False) -> ModelPathError:
    with pytest.raises(ModelPathError) as info:
        resolve_model(name, root, allow_hub)
    return info.value


def test_local_model_resolves_to_real_path(tree):
    got = resolve_model("tiny", tree["root"], allow_hub=False)
    assert got == ResolvedModel(source=os.path.realpath(tree["root"] / "tiny"), is_local=True, display="tiny")


def test_nested_and_inner_symlink_and_absolute_inside_root(tree):
    root = tree["root"]
    assert resolve_model("org/nested", root, False).display == "org/nested"
    assert resolve_model("alias", root, False).source == os.path.realpath(root / "tiny")
    assert resolve_model(str(root / "tiny"), root, False).display == "tiny"
    assert resolve_model("org/../tiny", root, False).display == "tiny"  # ".." that stays inside is fine


def test_local_wins_over_hub(tree):
    # "org/nested" looks like a hub id; the local directory is served first.
    assert resolve_model("org/nested", tree["root"], allow_hub=True).is_local


def test_root_given_through_a_symlink(tree):
    link = tree["tmp"] / "root-link"
    os.symlink(tree["root"], link)
    assert resolve_model("tiny", link, False).source == os.path.realpath(tree["root"] / "tiny")
    assert resolve_model(str(link / "tiny"), link, False).is_local


@pytest.mark.parametrize(
    "name",
    ["../outside", "../secret.txt", "tiny/../../outside", "escape", "prefix", "badlink", "../models-evil"],
)
def test_escapes_are_permission_denied(tree, name):
    assert _err(name, tree["root"], allow_hub=True).status == "PERMISSION_DENIED"


def test_absolute_outside_root_denied(tree):
    for name in (str(tree["outside"]), "/etc", "/etc/passwd", str(tree["root"]) + "-evil"):
        assert _err(name, tree["root"], allow_hub=True).status == "PERMISSION_DENIED"


def test_missing_or_not_a_model_is_not_found(tree):
    root = tree["root"]
    assert _err("nope", root).status == "NOT_FOUND"
    assert "config.json" in _err("empty", root).message
    assert _err("empty", root, allow_hub=True).status == "NOT_FOUND"  # local dir exists: no hub fallback
    assert _err("afile", root).status == "NOT_FOUND"
    assert _err(".", root).status == "NOT_FOUND"


def test_hub_ids(tree):
    root = tree["root"]
    err = _err("meta-llama/Llama-3.2-1B", root, allow_hub=False)
    assert err.status == "PERMISSION_DENIED"
    assert err.message == "hub ids are not allowed on this server (start it with --allow-hub)"
    got = resolve_model("meta-llama/Llama-3.2-1B", root, allow_hub=True)
    assert got == ResolvedModel("meta-llama/Llama-3.2-1B", False, "meta-llama/Llama-3.2-1B")
    assert resolve_model("gpt2", None, allow_hub=True).source == "gpt2"  # legacy id without org
    assert _err("gpt2", root, allow_hub=False).status == "NOT_FOUND"
    assert _err("org--x/y", root, allow_hub=True).status == "NOT_FOUND"  # not a valid hub id


def test_no_model_root(tree):
    assert _err("tiny", None).status == "NOT_FOUND"
    assert _err(str(tree["root"] / "tiny"), None, allow_hub=True).status == "PERMISSION_DENIED"
    assert _err("org/name", None, allow_hub=False).status == "PERMISSION_DENIED"


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "x" * 513, "tiny\n", "tiny\x1b[31m", " tiny"])
def test_invalid_names(tree, name):
    assert _err(name, tree["root"], allow_hub=True).status == "INVALID_ARGUMENT"


def test_512_chars_is_still_a_name(tree):
    assert _err("x" * 512, tree["root"]).status == "NOT_FOUND"


_segments = st.sampled_from(["..", ".", "tiny", "escape", "org", "nested", "alias", "/", "", "~", "x"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_segments, min_size=1, max_size=6), absolute=st.booleans(), allow_hub=st.booleans())
def test_never_resolves_outside_root(tree, parts, absolute, allow_hub):
    """Whatever the name, a local answer is a real path inside the real root."""
    root = tree["root"]
    name = "/".join(parts)
    if absolute:
        name = str(root) + "/" + name
    try:
        got = resolve_model(name, root, allow_hub)
    except ModelPathError as exc:
        assert exc.status in {"NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"}
        return
    if got.is_local:
        real_root = os.path.realpath(root)
        assert os.path.commonpath([got.source, real_root]) == real_root
        assert os.path.isfile(os.path.join(got.source, "config.json"))
    else:
        assert allow_hub and not name.startswith("/")
