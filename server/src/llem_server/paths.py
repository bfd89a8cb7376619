"""Model names -> a directory under ``--model-root`` or a hub id, refusing escapes.

``ModelConfig.model`` comes from the network, so it is treated as hostile:

* a name resolves **under the model root first** (``tiny`` -> ``<root>/tiny``);
* ``..`` that climbs out, absolute paths outside the root, and symlinks whose real
  path leaves the root are PERMISSION_DENIED. Containment is checked on
  ``os.path.realpath`` of both sides, so ``/models -> /mnt/nfs/models`` as the root
  itself is fine while ``/models/x -> /etc`` is not. Top-level entries of the
  model directory (``config.json``, weights) are checked the same way, because
  transformers opens them by name and would follow a link out of the root; so are the
  shard files that ``*.index.json`` files name (``weight_map``): relative, without
  ``..``, and resolving under the root, since transformers joins them to the directory;
* a directory without ``config.json`` is NOT_FOUND ("not a model");
* a name that looks like a hub id (``org/name``, or a bare legacy ``gpt2``) and is
  not a local directory goes to the hub only when the server allows it;
* empty names, NUL or other control characters, and names over 512 characters are
  INVALID_ARGUMENT.

The returned ``source`` is the resolved real path (or the hub id): hand exactly
that to ``from_pretrained``, so a symlink swapped after the check cannot redirect
the load. ``display`` is what messages and logs show; it never reveals the
server's directory layout beyond the root. Files inside the directory can still change
between this check (in the front, when a request arrives) and the load (later, in a
worker): the worker repeats it with :func:`check_local` just before ``from_pretrained``.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MAX_NAME_LENGTH", "ModelPathError", "ResolvedModel", "check_local", "resolve_model"]

MAX_NAME_LENGTH = 512

# Hugging Face repo ids: optional namespace, then the name; letters, digits, "-",
# "_", "."; no "--" or ".." (the hub refuses those too), at most 96 chars per part.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_INDEX_BYTES = 16 * 1024 * 1024  # a shard index names each tensor once: real ones are well under 1 MiB


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from.

    Attributes:
        source: what ``from_pretrained`` receives: a real absolute path, or a hub id.
        is_local: True for a directory under the model root.
        display: the name to show clients and logs (relative to the root, or the hub id).
        root: the model root's real path, for a local model (the worker checks again under it).
    """

    source: str
    is_local: bool
    display: str
    root: str | None = field(default=None, compare=False)


class ModelPathError(Exception):
    """A model name that cannot be served; ``status`` is a gRPC status code name and
    ``reason`` its ``ErrorInfo`` reason (``errors.REASONS``)."""

    _REASON = {"INVALID_ARGUMENT": "INVALID_REQUEST", "NOT_FOUND": "MODEL_NOT_FOUND",
               "FAILED_PRECONDITION": "MODEL_INVALID", "PERMISSION_DENIED": "OUTSIDE_MODEL_ROOT"}

    def __init__(self, status: str, message: str, reason: str | None = None):
        self.status = status
        self.message = message
        self.reason = reason or self._REASON[status]
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
        raise ModelPathError("PERMISSION_DENIED", "model: this server has no model root; local paths are not served",
                             reason="MODEL_ROOT_NOT_SET")

    if hub_like:
        if allow_hub:
            return ResolvedModel(source=name, is_local=False, display=name)
        if "/" in name:
            raise ModelPathError(
                "PERMISSION_DENIED", "hub ids are not allowed on this server (start it with --allow-hub)",
                reason="HUB_NOT_ALLOWED",
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
    _check_files(real, real_root, display)
    return ResolvedModel(source=real, is_local=True, display=display, root=real_root)


def check_local(source: str, model_root: str) -> None:
    """Check again, in the worker just before ``from_pretrained``, that the local model
    ``source`` (a :class:`ResolvedModel`'s) is still a model directory whose files stay under
    ``model_root``: the directory may have changed since the front checked it.
    Raises :class:`ModelPathError`."""
    real_root = os.path.realpath(model_root)
    real = os.path.realpath(source)
    display = os.path.relpath(source, real_root) if _inside(source, real_root) else os.path.basename(source)
    if real == real_root or not _inside(real, real_root):
        raise ModelPathError("PERMISSION_DENIED", f"model {display!r} now resolves outside the model root")
    if not os.path.isfile(os.path.join(real, "config.json")):
        raise ModelPathError("NOT_FOUND", f"{display!r} is no longer a model (no config.json)")
    _check_files(real, real_root, display)


def _check_files(real: str, real_root: str, display: str) -> None:
    """What transformers opens by name in the model directory stays under the root: its
    top-level entries, and the shards that ``*.index.json`` files name (it joins those names
    to the directory, so ``../x`` or ``/x`` would load weights from anywhere)."""
    try:
        entries = list(os.scandir(real))
    except OSError as exc:
        raise ModelPathError("PERMISSION_DENIED", f"model {display!r} cannot be read: {exc.strerror}",
                             reason="MODEL_UNREADABLE") from None
    for entry in entries:
        if entry.is_symlink() and not _inside(os.path.realpath(entry.path), real_root):
            raise ModelPathError(
                "PERMISSION_DENIED", f"model {display!r}: {entry.name} links outside the model root"
            )
    for entry in entries:
        if not entry.name.endswith(".index.json"):
            continue
        for name in _shard_names(entry.path, f"model {display!r}: {entry.name}"):
            inside = (isinstance(name, str) and name and "\x00" not in name and not os.path.isabs(name)
                      and ".." not in name.split("/"))
            if not inside or not _inside(os.path.realpath(os.path.join(real, name)), real_root):
                # The name is not repeated: it may tell the client about the layout outside the root.
                raise ModelPathError("PERMISSION_DENIED",
                                     f"model {display!r}: {entry.name} names a weight file outside the model root")


_INDEX_NAMES: dict[tuple, frozenset] = {}  # (dev, inode, size, mtime, ctime) of an index -> its names


def _shard_names(path: str, what: str) -> frozenset:
    """The file names in a shard index's ``weight_map``."""
    try:
        # Non-blocking: a FIFO named like an index must not hang the front process.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ModelPathError("PERMISSION_DENIED", f"{what} cannot be read: {exc.strerror}",
                             reason="MODEL_UNREADABLE") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelPathError("FAILED_PRECONDITION", f"{what} is not a regular file")
        # Parsed once per file version, not on every request (a large model's index takes ~1 ms,
        # against a 2 ms budget for a round trip): ctime changes with any write or rename.
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _INDEX_NAMES.get(key)
        if known is not None:
            return known
        data = f.read(_MAX_INDEX_BYTES + 1)
    if len(data) > _MAX_INDEX_BYTES:
        raise ModelPathError("FAILED_PRECONDITION", f"{what} is over {_MAX_INDEX_BYTES} bytes, too large to check")
    try:
        weight_map = json.loads(data).get("weight_map", {})
        names = frozenset(weight_map.values())
        if not all(isinstance(n, str) for n in names):
            raise TypeError("weight_map values must be file names")
    except (ValueError, AttributeError, TypeError):  # not JSON, not an object, names that are not strings
        raise ModelPathError("FAILED_PRECONDITION", f"{what} is not a shard index (JSON with a weight_map)") from None
    if len(_INDEX_NAMES) >= 256:
        _INDEX_NAMES.clear()
    _INDEX_NAMES[key] = names
    return names
