"""Unit tests of durable hard-state storage (celery_cluster.state_file)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from celery_cluster.errors import StateFileError
from celery_cluster.messages import HardState
from celery_cluster.state_file import StateFile

NODE = "127.0.0.1:8899"
OTHER = "127.0.0.1:8898"


def _checksum(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _document(**overrides: Any) -> dict[str, Any]:
    """A valid state document for NODE, with ``overrides`` applied and the checksum recomputed."""
    fields: dict[str, Any] = {
        "format": "celery-cluster-state",
        "format_version": 1,
        "node": NODE,
        "term": 3,
        "voted_for": OTHER,
        "payload_version": [2, 7],
        "payload": "hello",
    }
    fields.update(overrides)
    fields = {k: v for k, v in fields.items() if v is not _DROP}
    return {**fields, "checksum": _checksum(fields)}


_DROP = object()


def _write(path: Path, doc: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(doc).encode("utf-8")
    path.write_bytes(raw)
    return raw


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "state.json")


# --- round trip ----------------------------------------------------------------------


def test_path_is_state_json_in_directory(tmp_path: Path) -> None:
    sf = StateFile(tmp_path / "d", NODE)
    assert sf.path == tmp_path / "d" / "state.json"
    sf_str = StateFile(str(tmp_path / "d"), NODE)
    assert sf_str.path == sf.path


def test_load_missing_file_returns_none(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "never-created", NODE).load() is None
    assert not (tmp_path / "never-created").exists()  # loading creates nothing


def test_directory_created_lazily_on_first_save(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    sf = StateFile(directory, NODE)
    assert not directory.exists()
    sf.save(HardState(term=1))
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_existing_directory_is_fine(tmp_path: Path) -> None:
    sf = StateFile(tmp_path, NODE)
    sf.save(HardState(term=1))
    assert StateFile(tmp_path, NODE).load() == HardState(term=1)


@pytest.mark.parametrize(
    "state",
    [
        HardState(),
        HardState(term=5, voted_for=OTHER, payload_version=(4, 9), payload='{"beat": true}'),
        HardState(term=5, voted_for=None, payload_version=(4, 9), payload="x"),
        HardState(term=5, voted_for=NODE, payload_version=(0, 0), payload=None),
        HardState(term=1, voted_for="[::1]:8899", payload="héllo ☃ 日本語 \U0001f600 \n\t\"quoted\" \\ \x00"),
        HardState(term=2**53, payload_version=(2**53, 2**53), payload=""),
    ],
)
def test_round_trip(tmp_path: Path, state: HardState) -> None:
    StateFile(tmp_path, NODE).save(state)
    loaded = StateFile(tmp_path, NODE).load()
    assert loaded == state
    assert isinstance(loaded, HardState)
    assert isinstance(loaded.payload_version, tuple)


def test_file_format(tmp_path: Path) -> None:
    state = HardState(term=3, voted_for=OTHER, payload_version=(2, 7), payload="hello")
    StateFile(tmp_path, NODE).save(state)
    doc = json.loads((tmp_path / "state.json").read_text("utf-8"))
    assert doc == _document()


def test_file_format_with_defaults(tmp_path: Path) -> None:
    StateFile(tmp_path, NODE).save(HardState(term=1))
    doc = json.loads((tmp_path / "state.json").read_text("utf-8"))
    assert doc["voted_for"] is None
    assert doc["payload"] == ""  # the default payload is empty, not absent
    assert doc["payload_version"] == [0, 0]
    fields = {k: v for k, v in doc.items() if k != "checksum"}
    assert doc["checksum"] == _checksum(fields)


def test_loads_hand_written_file(tmp_path: Path) -> None:
    # The format is documented: a file written by another tool with the same rules loads.
    _write(tmp_path / "state.json", _document())
    assert StateFile(tmp_path, NODE).load() == HardState(
        term=3, voted_for=OTHER, payload_version=(2, 7), payload="hello"
    )


def test_file_mode_is_0600(tmp_path: Path) -> None:
    StateFile(tmp_path, NODE).save(HardState(term=1))
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600


def test_overwrite_keeps_latest(tmp_path: Path) -> None:
    sf = StateFile(tmp_path, NODE)
    for term in range(1, 6):
        sf.save(HardState(term=term, voted_for=NODE))
    assert StateFile(tmp_path, NODE).load() == HardState(term=5, voted_for=NODE)


# --- atomicity and durability -----------------------------------------------------------


def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    sf = StateFile(tmp_path, NODE)
    for term in range(10):
        sf.save(HardState(term=term))
    assert _leftovers(tmp_path) == []


def test_save_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    StateFile(tmp_path, NODE).save(HardState(term=1))
    assert synced == ["file", "dir"]


def test_first_save_fsyncs_the_parent_of_every_directory_it_creates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new state directory is an entry in its parent: without syncing the parent, a crash
    right after the first save can lose the directory - and the vote in it."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    directory = tmp_path / "a" / "b"
    StateFile(directory, NODE).save(HardState(term=1))
    # The parents of a and of b, in creation order, then the file, then its directory.
    assert synced[:2] == [str(tmp_path), str(tmp_path / "a")]
    assert synced[2].startswith(str(directory / ".state.json."))
    assert synced[3:] == [str(directory)]
    synced.clear()
    StateFile(directory, NODE).save(HardState(term=2))  # the directories exist now
    assert synced[1:] == [str(directory)]


def test_failed_replace_leaves_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf = StateFile(tmp_path, NODE)
    old = HardState(term=1, voted_for=NODE, payload="old")
    sf.save(old)
    before = (tmp_path / "state.json").read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StateFileError) as info:
        sf.save(HardState(term=2, voted_for=OTHER, payload="new"))
    assert str(tmp_path / "state.json") in str(info.value)
    assert "No space left on device" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)

    assert (tmp_path / "state.json").read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert StateFile(tmp_path, NODE).load() == old


def test_failed_write_leaves_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf = StateFile(tmp_path, NODE)
    sf.save(HardState(term=1))
    before = (tmp_path / "state.json").read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StateFileError, match="Input/output error"):
        sf.save(HardState(term=2))
    assert (tmp_path / "state.json").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_save_retries_after_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed save must not be remembered as "already saved", or the retry would be skipped.
    sf = StateFile(tmp_path, NODE)
    sf.save(HardState(term=1))
    real_replace = os.replace

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StateFileError):
        sf.save(HardState(term=2))
    monkeypatch.setattr(os, "replace", real_replace)
    sf.save(HardState(term=2))
    assert StateFile(tmp_path, NODE).load() == HardState(term=2)


def test_save_into_unwritable_location_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    sf = StateFile(blocker / "sub", NODE)
    with pytest.raises(StateFileError, match="cannot save state file") as info:
        sf.save(HardState(term=1))
    assert str(blocker / "sub" / "state.json") in str(info.value)


def test_save_refuses_invalid_state(tmp_path: Path) -> None:
    # Writing what load() would refuse would stop the node at its next start.
    sf = StateFile(tmp_path, NODE)
    with pytest.raises(ValueError, match="term"):
        sf.save(HardState(term=-1))
    with pytest.raises(ValueError, match="payload_version"):
        sf.save(HardState(payload_version=(0, -1)))
    assert not (tmp_path / "state.json").exists()


# --- skipping identical writes -----------------------------------------------------------


def _count_replaces(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    real_replace = os.replace

    def counting_replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting_replace)
    return calls


def test_save_skips_identical_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_replaces(monkeypatch)
    sf = StateFile(tmp_path, NODE)
    state = HardState(term=4, voted_for=NODE, payload_version=(4, 1), payload="p")
    sf.save(state)
    mtime = (tmp_path / "state.json").stat().st_mtime_ns
    sf.save(state)
    sf.save(HardState(term=4, voted_for=NODE, payload_version=(4, 1), payload="p"))  # equal, not identical
    assert len(calls) == 1
    assert (tmp_path / "state.json").stat().st_mtime_ns == mtime

    sf.save(HardState(term=5))
    assert len(calls) == 2


def test_save_skips_state_equal_to_loaded_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    StateFile(tmp_path, NODE).save(HardState(term=7, voted_for=OTHER))
    calls = _count_replaces(monkeypatch)
    sf = StateFile(tmp_path, NODE)
    state = sf.load()
    assert state is not None
    sf.save(state)
    assert calls == []
    sf.save(HardState(term=8))
    assert len(calls) == 1


def test_fresh_instance_writes_even_default_state(tmp_path: Path) -> None:
    # Nothing saved or loaded yet: the first save always writes, even HardState().
    StateFile(tmp_path, NODE).save(HardState())
    assert (tmp_path / "state.json").exists()


# --- refusing untrustworthy files ------------------------------------------------------------


def _assert_refused(directory: Path, raw: bytes, *fragments: str) -> StateFileError:
    """load() raises StateFileError naming the path and ``fragments``; the file is untouched."""
    path = directory / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    mtime = path.stat().st_mtime_ns
    sf = StateFile(directory, NODE)
    with pytest.raises(StateFileError) as info:
        sf.load()
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert path.read_bytes() == raw
    assert path.stat().st_mtime_ns == mtime
    assert _leftovers(directory) == []
    # Still refused on a second attempt: nothing was "repaired" or reset.
    with pytest.raises(StateFileError):
        StateFile(directory, NODE).load()
    return info.value


CORRUPT_ADVICE = (
    "refusing to start: a reset could vote twice in a term; restore the file or remove it deliberately"
)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"\x00" * 64,  # what some file systems leave after a crash
    ],
)
def test_corrupt_json_refused(tmp_path: Path, raw: bytes) -> None:
    _assert_refused(tmp_path, raw, "corrupt", CORRUPT_ADVICE)


def test_truncated_file_refused(tmp_path: Path) -> None:
    StateFile(tmp_path, NODE).save(HardState(term=9, voted_for=NODE, payload="x" * 100))
    raw = (tmp_path / "state.json").read_bytes()
    for cut in (1, len(raw) // 2, len(raw) - 3):
        _assert_refused(tmp_path, raw[:cut], "corrupt", CORRUPT_ADVICE)


@pytest.mark.parametrize("doc", [[], [1, 2], "state", 42, None])
def test_non_object_refused(tmp_path: Path, doc: Any) -> None:
    _assert_refused(tmp_path, json.dumps(doc).encode(), "not a JSON object", CORRUPT_ADVICE)


def test_checksum_mismatch_refused(tmp_path: Path) -> None:
    doc = _document()
    doc["term"] = 2  # e.g. a bit flip, or a hand edit rolling the term back
    _assert_refused(tmp_path, json.dumps(doc).encode(), "checksum mismatch", CORRUPT_ADVICE)


@pytest.mark.parametrize("checksum", [_DROP, None, "", "0" * 64, 123])
def test_missing_or_bad_checksum_refused(tmp_path: Path, checksum: Any) -> None:
    doc = _document()
    if checksum is _DROP:
        del doc["checksum"]
    else:
        doc["checksum"] = checksum
    _assert_refused(tmp_path, json.dumps(doc).encode(), "checksum", CORRUPT_ADVICE)


def test_flipped_byte_in_saved_file_refused(tmp_path: Path) -> None:
    StateFile(tmp_path, NODE).save(HardState(term=12, voted_for=NODE, payload="abc"))
    raw = (tmp_path / "state.json").read_bytes()
    tampered = raw.replace(b'"abc"', b'"abd"')
    assert tampered != raw
    _assert_refused(tmp_path, tampered, "checksum mismatch")


def test_foreign_node_refused(tmp_path: Path) -> None:
    doc = _document(node=OTHER)
    error = _assert_refused(tmp_path, json.dumps(doc).encode())
    assert str(error) == (
        f"state file {tmp_path / 'state.json'} was written by node {OTHER}, not {NODE}: "
        "point --state-dir at this node's own directory"
    )


def test_foreign_node_written_by_state_file(tmp_path: Path) -> None:
    StateFile(tmp_path, OTHER).save(HardState(term=3, voted_for=OTHER))
    with pytest.raises(StateFileError, match=f"written by node {OTHER}, not {NODE}"):
        StateFile(tmp_path, NODE).load()
    assert StateFile(tmp_path, OTHER).load() == HardState(term=3, voted_for=OTHER)


@pytest.mark.parametrize("fmt", [_DROP, "something-else", None, 1])
def test_wrong_format_tag_refused(tmp_path: Path, fmt: Any) -> None:
    _assert_refused(tmp_path, json.dumps(_document(format=fmt)).encode(), "not a celery-cluster state file")


@pytest.mark.parametrize("version", [_DROP, 0, 2, "1", 1.0, 1.5, True, None])
def test_wrong_format_version_refused(tmp_path: Path, version: Any) -> None:
    _assert_refused(tmp_path, json.dumps(_document(format_version=version)).encode(), "format version")


@pytest.mark.parametrize("field", ["node", "term", "voted_for", "payload_version", "payload"])
def test_missing_field_refused(tmp_path: Path, field: str) -> None:
    raw = json.dumps(_document(**{field: _DROP})).encode()
    _assert_refused(tmp_path, raw, f"missing {field}", CORRUPT_ADVICE)


def test_unknown_field_refused(tmp_path: Path) -> None:
    _assert_refused(tmp_path, json.dumps(_document(leader="x:1")).encode(), "unexpected leader")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("term", -1),
        ("term", 1.0),
        ("term", "3"),
        ("term", None),
        ("term", True),
        ("term", 2**53 + 1),
        ("voted_for", 5),
        ("voted_for", ""),
        ("voted_for", ["a:1"]),
        ("payload_version", [1]),
        ("payload_version", [1, 2, 3]),
        ("payload_version", [1, -2]),
        ("payload_version", [-1, 2]),
        ("payload_version", [1.0, 2]),
        ("payload_version", ["1", "2"]),
        ("payload_version", {"term": 1, "seq": 2}),
        ("payload_version", None),
        ("payload", 5),
        ("payload", {"a": 1}),
        ("payload", ["x"]),
    ],
)
def test_wrong_typed_field_refused(tmp_path: Path, field: str, value: Any) -> None:
    # The checksum is valid: these are written by a buggy tool or a careful hand, not by a bit flip.
    _assert_refused(tmp_path, json.dumps(_document(**{field: value})).encode(), field, CORRUPT_ADVICE)


def test_unreadable_path_raises(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()  # a directory where the file should be
    with pytest.raises(StateFileError, match="cannot read state file") as info:
        StateFile(tmp_path, NODE).load()
    assert str(tmp_path / "state.json") in str(info.value)


def test_failed_load_does_not_enable_skipping(tmp_path: Path) -> None:
    # After a refused load nothing is "known" about the file, so a later save must write.
    (tmp_path / "state.json").write_bytes(b"garbage")
    sf = StateFile(tmp_path, NODE)
    with pytest.raises(StateFileError):
        sf.load()
    sf.save(HardState(term=1))
    assert StateFile(tmp_path, NODE).load() == HardState(term=1)


# --- the replicated configuration -----------------------------------------------------------

CONFIG = {"members": [NODE, OTHER, "127.0.0.1:8897"], "config_version": [2, 5], "cluster": "0123456789abcdef"}


def test_configuration_round_trip(tmp_path: Path) -> None:
    state = HardState(term=3, voted_for=OTHER, payload_version=(2, 7), payload="hello",
                      members=tuple(CONFIG["members"]), config_version=(2, 5), cluster=CONFIG["cluster"])
    StateFile(tmp_path, NODE).save(state)
    doc = json.loads((tmp_path / "state.json").read_text("utf-8"))
    assert doc == _document(**CONFIG)
    assert StateFile(tmp_path, NODE).load() == state


def test_file_without_configuration_loads_as_before(tmp_path: Path) -> None:
    # Files of releases before membership changes: the node bootstraps from its static list.
    _write(tmp_path / "state.json", _document())
    assert StateFile(tmp_path, NODE).load().members == ()


@pytest.mark.parametrize("field", sorted(CONFIG))
def test_partial_configuration_refused(tmp_path: Path, field: str) -> None:
    raw = json.dumps(_document(**{**CONFIG, field: _DROP})).encode()
    _assert_refused(tmp_path, raw, f"missing {field}", CORRUPT_ADVICE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("members", "127.0.0.1:1"),
        ("members", [NODE, NODE]),
        ("members", [NODE, 5]),
        ("members", [NODE, ""]),
        ("members", [f"127.0.0.1:{p}" for p in range(1, 66)]),
        ("config_version", [1]),
        ("config_version", None),
        ("cluster", 5),
        ("cluster", ""),
        ("cluster", "x" * 65),
    ],
)
def test_wrong_configuration_refused(tmp_path: Path, field: str, value: Any) -> None:
    raw = json.dumps(_document(**{**CONFIG, field: value})).encode()
    _assert_refused(tmp_path, raw, field, CORRUPT_ADVICE)
