"""Model names -> a directory under ``--model-root`` or a hub id, refusing escapes.

``ModelConfig.model`` comes from the network, so it is treated as hostile:

* a name resolves **under the model root first** (``tiny`` -> ``<root>/tiny``);
* ``..`` that climbs out, absolute paths outside the root, and symlinks whose real
  path leaves the root are PERMISSION_DENIED. Containment is checked on
  ``os.path.realpath`` of both sides, so ``/models -> /mnt/nfs/models`` as the root
  itself is fine while ``/models/x -> /etc`` is not. Top-level entries of the
  model directory (``config.json``, weights) are checked the same way, because
  transformers opens them by name and would follow a link out of the root;
* a directory without ``config.json`` is NOT_FOUND ("not a model");
* a name that looks like a hub id (``org/name``, or a bare legacy ``gpt2``) and is
  not a local directory goes to the hub only when the server allows it;
* empty names, NUL or other control characters, and names over 512 characters are
  INVALID_ARGUMENT.

The returned ``source`` is the resolved real path (or the hub id): hand exactly
that to ``from_pretrained``, so a symlink swapped after the check cannot redirect
the load. ``display`` is what messages and logs show; it never reveals the
server's directory layout beyond the root.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAX_NAME_LENGTH", "ModelPathError", "ResolvedModel", "resolve_model"]

MAX_NAME_LENGTH = 512

# Hugging Face repo ids: optional namespace, then the name; letters, digits, "-",
# "_", "."; no "--" or ".." (the hub refuses those too), at most 96 chars per part.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from.

    Attributes:
        source: what ``from_pretrained`` receives: a real absolute path, or a hub id.
        is_local: True for a directory under the model root.
        display: the name to show clients and logs (relative to the root, or the hub id).
    """

    source: str
    is_local: bool
    display: str


class ModelPathError(Exception):
    """A model name that cannot be served; ``status`` is a gRPC status code name."""

    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message
        super().__init__(message)

    def __repr__(self) -> str:
        return f"ModelPathError({self.status}, {self.message!r})"


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name


def _inside(path: str, root: str) -> bool:
    # commonpath, not startswith: "/models-evil" must not count as inside "/models".
    return path == root or os.path.commonpath([path, root]) == root


def resolve_model(name: str, model_root: Path | str | None, allow_hub: bool) -> ResolvedModel:
    """Resolve ``ModelConfig.model``; raise :class:`ModelPathError` when it cannot be served.

    Args:
        name: the client's model name.
        model_root: the server's ``--model-root`` (None: no local models).
        allow_hub: whether hub ids may be downloaded (``--allow-hub``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelPathError("INVALID_ARGUMENT", "model: a model name is required")
    if "\x00" in name:
        raise ModelPathError("INVALID_ARGUMENT", "model: the name contains a NUL byte")
    if len(name) > MAX_NAME_LENGTH:
        raise ModelPathError("INVALID_ARGUMENT", f"model: the name is longer than {MAX_NAME_LENGTH} characters")
    if _CONTROL.search(name):
        # Newlines and escapes would forge log lines and never name a real model.
        raise ModelPathError("INVALID_ARGUMENT", "model: the name contains control characters")
    if name != name.strip():
        raise ModelPathError("INVALID_ARGUMENT", "model: the name has leading or trailing whitespace")

    hub_like = _looks_like_hub_id(name)

    if model_root is not None:
        local = _resolve_local(name, Path(model_root))
        if local is not None:
            return local
    elif os.path.isabs(name):
        raise ModelPathError("PERMISSION_DENIED", "model: this server has no model root; local paths are not served")

    if hub_like:
        if allow_hub:
            return ResolvedModel(source=name, is_local=False, display=name)
        if "/" in name:
            raise ModelPathError(
                "PERMISSION_DENIED", "hub ids are not allowed on this server (start it with --allow-hub)"
            )
    where = "under the model root" if model_root is not None else "(this server has no model root)"
    raise ModelPathError("NOT_FOUND", f"model {name!r} not found {where}")


def _resolve_local(name: str, root: Path) -> ResolvedModel | None:
    """The model under ``root``, or None when no such directory exists (hub may apply)."""
    real_root = os.path.realpath(root)
    candidate = name if os.path.isabs(name) else os.path.join(real_root, name)
    # Lexical check first: ".." that climbs out is refused even if the target is missing,
    # so the answer never tells a client what exists outside the root.
    lexical = os.path.normpath(candidate)
    if not os.path.isabs(name):
        if not _inside(lexical, real_root):
            raise ModelPathError("PERMISSION_DENIED", f"model {name!r} is outside the model root")
    elif not (_inside(lexical, real_root) or _inside(lexical, os.path.normpath(os.path.abspath(root)))):
        raise ModelPathError("PERMISSION_DENIED", f"model {name!r} is outside the model root")

    real = os.path.realpath(candidate)
    if not _inside(real, real_root):
        raise ModelPathError("PERMISSION_DENIED", f"model {name!r} resolves outside the model root")
    if not os.path.exists(real):
        return None
    display = os.path.relpath(real, real_root)
    if not os.path.isdir(real):
        raise ModelPathError("NOT_FOUND", f"model {display!r} is not a directory")
    if real == real_root:
        raise ModelPathError("NOT_FOUND", "model: the model root itself is not a model")
    if not os.path.isfile(os.path.join(real, "config.json")):
        raise ModelPathError("NOT_FOUND", f"{display!r} is not a model (no config.json)")
    try:
        entries = list(os.scandir(real))
    except OSError as exc:
        raise ModelPathError("PERMISSION_DENIED", f"model {display!r} cannot be read: {exc.strerror}") from None
    for entry in entries:
        if entry.is_symlink() and not _inside(os.path.realpath(entry.path), real_root):
            raise ModelPathError(
                "PERMISSION_DENIED", f"model {display!r}: {entry.name} links outside the model root"
            )
    return ResolvedModel(source=real, is_local=True, display=display)
