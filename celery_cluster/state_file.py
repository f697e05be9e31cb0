"""Durable storage of one node's :class:`HardState` in ``<state dir>/state.json``.

Raft's safety rests on a node never forgetting its term and vote: a node that restarts
with a blank state could vote twice in one term and let two leaders be elected. So a file
that cannot be trusted is an error for the operator, never a silent reset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import StateFileError
from .messages import MAX_ADDRESS_LEN, MAX_CLUSTER_ID_LEN, MAX_MEMBERS, MAX_NUMBER, HardState

FORMAT = "celery-cluster-state"
FORMAT_VERSION = 1
_FILE_NAME = "state.json"
_FIELDS = frozenset({"format", "format_version", "node", "term", "voted_for", "payload_version", "payload"})
#: The replicated configuration: written by releases with membership changes, absent from older files
#: (those nodes bootstrap from --cluster-nodes, as before).
_CONFIG_FIELDS = frozenset({"members", "config_version", "cluster"})
_CORRUPT_ADVICE = (
    "refusing to start: a reset could vote twice in a term; restore the file or remove it deliberately"
)


def _checksum(fields: dict[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of every field but the checksum itself."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _is_count(value: Any) -> bool:
    # bool is an int subclass; JSON true is not a term.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMBER


def _field_problem(doc: dict[str, Any]) -> str | None:
    """What is wrong with the state fields of ``doc``, or None."""
    if not _is_count(doc.get("term")):
        return "'term' must be an integer from 0 to 2**53"
    voted_for = doc.get("voted_for")
    if voted_for is not None and (not isinstance(voted_for, str) or not voted_for):
        return "'voted_for' must be null or a node address"
    version = doc.get("payload_version")
    if not isinstance(version, list) or len(version) != 2 or not all(_is_count(n) for n in version):
        return "'payload_version' must be [term, sequence] with integers from 0 to 2**53"
    payload = doc.get("payload")
    if payload is not None and not isinstance(payload, str):
        return "'payload' must be null or a string"
    if "members" in doc:
        members = doc.get("members")
        if (not isinstance(members, list) or len(members) > MAX_MEMBERS or len(set(map(str, members))) != len(members)
                or not all(isinstance(m, str) and 0 < len(m) <= MAX_ADDRESS_LEN for m in members)):
            return f"'members' must be a list of at most {MAX_MEMBERS} distinct node addresses"
        config = doc.get("config_version")
        if not isinstance(config, list) or len(config) != 2 or not all(_is_count(n) for n in config):
            return "'config_version' must be [term, sequence] with integers from 0 to 2**53"
        cluster = doc.get("cluster")
        if not isinstance(cluster, str) or len(cluster) > MAX_CLUSTER_ID_LEN or bool(cluster) != bool(members):
            return "'cluster' must be the cluster id string (empty only with no members)"
    return None


class StateFile:
    """The hard state of node ``node_id``, kept in ``directory/state.json``."""

    def __init__(self, directory: str | os.PathLike[str], node_id: str) -> None:
        self.directory = Path(directory)
        self.node_id = node_id
        self.path = self.directory / _FILE_NAME
        # What the file is known to hold, so saving an unchanged state costs nothing.
        self._last: HardState | None = None

    def ensure_writable(self) -> None:
        """Create the directory (durably) and prove a file can be written and synced there,
        so that a wrong path or permission is a clear error at start, not at the first vote.

        Raises :class:`StateFileError` naming the directory and the OS error.
        """
        try:
            _make_durable_dirs(self.directory)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".probe.", suffix=".tmp")
            try:
                os.write(fd, b"celery-cluster")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise StateFileError(
                f"cannot use state directory {self.directory}: {exc.strerror or exc}: give this node a "
                "directory it can create and write (--state-dir / --cluster-state-dir)"
            ) from None

    def load(self) -> HardState | None:
        """The stored state, or None if this node has never saved one.

        Raises :class:`StateFileError` if the file is unreadable, corrupt, from an
        unknown format version or written by another node; the file is left untouched.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(
                f"cannot read state file {self.path}: {exc.strerror or exc}: "
                "fix the path or give this node's user read and write access to it"
            ) from exc
        state = self._parse(raw)
        self._last = state
        return state

    def _parse(self, raw: bytes) -> HardState:
        def corrupt(problem: str) -> StateFileError:
            return StateFileError(f"state file {self.path} is corrupt ({problem}): {_CORRUPT_ADVICE}")

        try:
            doc = json.loads(raw.decode("utf-8"))
        except ValueError:  # also UnicodeDecodeError
            raise corrupt("not valid JSON; truncated?") from None
        if not isinstance(doc, dict):
            raise corrupt("not a JSON object")
        if doc.get("format") != FORMAT:
            raise StateFileError(
                f"{self.path} is not a celery-cluster state file (no \"format\": \"{FORMAT}\"): "
                "point --state-dir at this node's own directory, or move the file away"
            )
        version = doc.get("format_version")
        # type() check: JSON true and 1.0 compare equal to 1 in Python.
        if type(version) is not int or version != FORMAT_VERSION:
            raise StateFileError(
                f"state file {self.path} has format version {version!r}, "
                f"this celery-cluster reads version {FORMAT_VERSION}: run the celery-cluster release "
                "that wrote it (or a newer one)"
            )
        fields = {k: v for k, v in doc.items() if k != "checksum"}
        if doc.get("checksum") != _checksum(fields):
            raise corrupt("checksum mismatch")
        present_config = _CONFIG_FIELDS & set(fields)
        missing = (_FIELDS | (_CONFIG_FIELDS if present_config else frozenset())) - set(fields)
        unknown = set(fields) - _FIELDS - _CONFIG_FIELDS
        if missing or unknown:
            what = [f"missing {', '.join(sorted(missing))}"] if missing else []
            what += [f"unexpected {', '.join(sorted(unknown))}"] if unknown else []
            raise corrupt(f"field(s) {'; '.join(what)}")
        if doc["node"] != self.node_id:
            raise StateFileError(
                f"state file {self.path} was written by node {doc['node']}, not {self.node_id}: "
                "point --state-dir at this node's own directory"
            )
        problem = _field_problem(doc)
        if problem:
            raise corrupt(problem)
        term, sequence = doc["payload_version"]
        config_term, config_sequence = doc.get("config_version", (0, 0))
        return HardState(
            term=doc["term"],
            voted_for=doc["voted_for"],
            payload_version=(term, sequence),
            payload=doc["payload"],
            members=tuple(doc.get("members", ())),
            config_version=(config_term, config_sequence),
            cluster=doc.get("cluster", ""),
        )

    def save(self, state: HardState) -> None:
        """Store ``state`` atomically and durably; a no-op if it is what the file holds.

        When this returns, the state survives a crash or power loss; until then the old
        file is intact. Raises :class:`StateFileError` if the state cannot be written.
        """
        if state == self._last:
            return
        fields: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "node": self.node_id,
            "term": state.term,
            "voted_for": state.voted_for,
            "payload_version": list(state.payload_version),
            "payload": state.payload,
        }
        if state.members:  # a replicated configuration (files without one read as before)
            fields.update(members=list(state.members), config_version=list(state.config_version),
                          cluster=state.cluster)
        # Never write what load() would refuse: that would stop the node at its next start.
        problem = _field_problem(fields)
        if problem:
            raise ValueError(f"refusing to save an invalid state {state!r}: {problem}")
        data = json.dumps({**fields, "checksum": _checksum(fields)}, indent=2, sort_keys=True) + "\n"
        try:
            self._write(data.encode("utf-8"))
        except OSError as exc:
            raise StateFileError(
                f"cannot save state file {self.path}: {exc.strerror or exc}: "
                "check free disk space and this node's write access to the directory"
            ) from exc
        self._last = state

    def _write(self, data: bytes) -> None:
        _make_durable_dirs(self.directory)
        # mkstemp creates the file with mode 0o600, in the same directory so that
        # os.replace is an atomic rename on one file system.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{_FILE_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename itself lives in the directory: sync it, or a crash may undo it.
        _fsync_dir(self.directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_dirs(directory: Path) -> None:
    """``mkdir -p`` whose result survives a crash: every directory created is an entry in
    its parent, so each parent is synced after the child appears in it."""
    missing = []
    path = directory
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue  # created meanwhile by someone else, who syncs it
        _fsync_dir(path.parent)
