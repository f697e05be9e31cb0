"""Unit tests of settings parsing and validation (celery_cluster.config)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from celery_cluster.config import (
    Membership,
    Timing,
    check_membership,
    default_state_dir,
    parse_address,
    parse_nodes,
    parse_timeout_range,
    split_host_port,
)
from celery_cluster.errors import ClusterError, ConfigurationError

# --- parse_address -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8899", "127.0.0.1:8899"),
        ("localhost:1", "localhost:1"),
        ("localhost:65535", "localhost:65535"),
        ("  127.0.0.1:8899  ", "127.0.0.1:8899"),
        ("\t10.0.0.7:80\n", "10.0.0.7:80"),
        ("Worker-1.Example.COM:8899", "worker-1.example.com:8899"),
        ("worker_1:8899", "worker_1:8899"),
        ("w1:08899", "w1:8899"),
        ("[::1]:8899", "[::1]:8899"),
        ("[0:0:0:0:0:0:0:1]:8899", "[::1]:8899"),
        ("[FE80::A]:1", "[fe80::a]:1"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("[::ffff:127.0.0.1]:80", "[::ffff:7f00:1]:80"),
    ],
)
def test_parse_address_accepts_and_normalises(text: str, expected: str) -> None:
    assert parse_address(text) == expected


def test_parse_address_is_idempotent() -> None:
    for text in ("Host.Example:1", "[0::1]:2", " 1.2.3.4:5 "):
        once = parse_address(text)
        assert parse_address(once) == once


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "foo",
        "foo:",
        ":8899",
        "foo:bar",
        "foo:0",
        "foo:65536",
        "foo:99999999",
        "foo:-1",
        "foo:+1",
        "foo:1.5",
        "foo:８８",  # full-width digits: isdigit() is true, but not a port
        "foo: 1",
        "foo :1",
        "a b:1",
        "a\tb:1",
        "::1:8899",  # bare IPv6 without brackets
        "::1",
        "2001:db8::1:443",
        "[::1]",
        "[::1]:",
        "[::1]8899",
        "[::1]:0",
        "[::1]:65536",
        "[not-v6]:1",
        "[127.0.0.1]:1",
        "[[::1]]:1",
        "http://host:1",
        "host/path:1",
        "-host:1",
        "host-:1",
        "ho..st:1",
        ".host:1",
        "host.:1",
        "héllo:1",
        "1.2.3.4.5:1",
        "256.0.0.1:1",
        "127.000.0.1:1",
        "1:1",
        "a" * 64 + ":1",
        ".".join(["a" * 60] * 5) + ":1",
        "host:1:2",
    ],
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_address(text)
    message = str(info.value)
    assert message.startswith(f"invalid node address {text!r}: expected HOST:PORT")


def test_parse_address_message_format() -> None:
    with pytest.raises(ConfigurationError, match=r"^invalid node address 'foo': expected HOST:PORT$"):
        parse_address("foo")


def test_parse_address_hints() -> None:
    with pytest.raises(ConfigurationError, match=r"brackets.*\[::1\]:8899"):
        parse_address("::1:8899")
    with pytest.raises(ConfigurationError, match="port from 1 to 65535"):
        parse_address("host:70000")


@pytest.mark.parametrize("value", [None, 8899, b"host:1", ("h", 1)])
def test_parse_address_refuses_non_strings(value: object) -> None:
    with pytest.raises(ConfigurationError, match="invalid node address"):
        parse_address(value)  # type: ignore[arg-type]


def test_configuration_error_is_a_value_error_and_cluster_error() -> None:
    with pytest.raises(ValueError):
        parse_address("nope")
    with pytest.raises(ClusterError):
        parse_address("nope")


# --- split_host_port -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8899", ("127.0.0.1", 8899)),
        ("[::1]:8899", ("::1", 8899)),
        ("[0::1]:8899", ("::1", 8899)),
        (" Host:1 ", ("host", 1)),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


def test_split_host_port_refuses_bad_address() -> None:
    with pytest.raises(ConfigurationError, match="invalid node address '::1:1'"):
        split_host_port("::1:1")


# --- parse_nodes -----------------------------------------------------------------------


def test_parse_nodes_from_string_keeps_order() -> None:
    assert parse_nodes("c:3, a:1 ,b:2") == ("c:3", "a:1", "b:2")


def test_parse_nodes_from_iterables() -> None:
    assert parse_nodes(["h:1", "[::1]:2"]) == ("h:1", "[::1]:2")
    assert parse_nodes(("h:1",)) == ("h:1",)
    assert parse_nodes(a for a in ["x:1", "y:1"]) == ("x:1", "y:1")


def test_parse_nodes_single_node() -> None:
    assert parse_nodes("127.0.0.1:8899") == ("127.0.0.1:8899",)


def test_parse_nodes_ipv6_in_comma_list() -> None:
    assert parse_nodes("[::1]:1,[::1]:2") == ("[::1]:1", "[::1]:2")


@pytest.mark.parametrize("nodes", ["", "  ", [], ()])
def test_parse_nodes_refuses_empty(nodes: object) -> None:
    with pytest.raises(ConfigurationError, match="node list is empty"):
        parse_nodes(nodes)  # type: ignore[arg-type]


@pytest.mark.parametrize("nodes", ["a:1,,b:1", "a:1,b:1,", ",a:1", ["a:1", " "]])
def test_parse_nodes_refuses_empty_entries(nodes: object) -> None:
    # A missing entry usually means an unset template variable: running with fewer
    # nodes would change the majority, so it is an error, not something to skip.
    with pytest.raises(ConfigurationError, match="empty entry in the node list") as info:
        parse_nodes(nodes)  # type: ignore[arg-type]
    assert "a:1" in str(info.value)


@pytest.mark.parametrize(
    ("nodes", "duplicate"),
    [
        ("127.0.0.1:8899,127.0.0.1:8898,127.0.0.1:8899", "127.0.0.1:8899"),
        (["Host:1", "host:1"], "host:1"),
        (["[::1]:5", "[0:0::1]:5"], "[::1]:5"),
        (" a:1 , a:01", "a:1"),
    ],
)
def test_parse_nodes_refuses_duplicates(nodes: object, duplicate: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_nodes(nodes)  # type: ignore[arg-type]
    assert str(info.value) == f"duplicate node address {duplicate} in the node list"


def test_parse_nodes_same_host_other_port_is_fine() -> None:
    assert parse_nodes("h:1,h:2") == ("h:1", "h:2")


def test_parse_nodes_reports_the_bad_entry() -> None:
    with pytest.raises(ConfigurationError, match=r"invalid node address 'bogus'"):
        parse_nodes("a:1,bogus,c:1")


# --- check_membership -----------------------------------------------------------------


def test_check_membership_ok(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_cluster"):
        check_membership(("a:1", "b:1", "c:1"), "b:1")
        check_membership("a:1", "a:1")
    assert caplog.records == []


def test_check_membership_normalises_both_sides() -> None:
    check_membership(" A:1,b:1,c:1", "a:1 ")
    check_membership(["[0::1]:1", "b:1", "c:1"], "[::1]:1")


def test_check_membership_refuses_outsider() -> None:
    with pytest.raises(ConfigurationError) as info:
        check_membership(["a:1", "b:1", "c:1"], "127.0.0.1:8899")
    assert str(info.value) == (
        "the node list must include this node's advertise address 127.0.0.1:8899 (got: a:1, b:1, c:1)"
    )


def test_check_membership_refuses_bad_advertise_address() -> None:
    with pytest.raises(ConfigurationError, match="invalid node address 'nope'"):
        check_membership(["a:1"], "nope")


@pytest.mark.parametrize(
    ("count", "fragment"),
    [
        (2, "2 nodes need both up"),
        (4, "4 nodes tolerate 1 failure, like 3"),
        (6, "6 nodes tolerate 2 failures, like 5"),
    ],
)
def test_check_membership_warns_on_even_count(
    caplog: pytest.LogCaptureFixture, count: int, fragment: str
) -> None:
    nodes = [f"n{i}:1" for i in range(count)]
    with caplog.at_level(logging.WARNING, logger="celery_cluster"):
        check_membership(nodes, "n0:1")
    [record] = caplog.records
    assert record.name == "celery_cluster"
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert fragment in message
    assert f"{count} nodes" in message
    assert f"use {count - 1} or {count + 1} nodes" in message


@pytest.mark.parametrize("count", [1, 3, 5, 7])
def test_check_membership_odd_count_does_not_warn(caplog: pytest.LogCaptureFixture, count: int) -> None:
    nodes = [f"n{i}:1" for i in range(count)]
    with caplog.at_level(logging.WARNING, logger="celery_cluster"):
        check_membership(nodes, "n0:1")
    assert caplog.records == []


def test_check_membership_outsider_error_beats_even_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_cluster"), pytest.raises(ConfigurationError):
        check_membership(["a:1", "b:1"], "c:1")
    assert caplog.records == []


def test_membership_parses_once_and_normalises() -> None:
    m = Membership.parse(" A:1,[0::1]:2,c:1", "a:1 ")
    assert m == Membership(("a:1", "[::1]:2", "c:1"), "a:1")
    assert m.peers == ("[::1]:2", "c:1")


def test_one_even_count_warning_on_the_worker_path(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    """The worker's settings parse the node list once; Cluster takes that Membership as it is."""
    from celery_cluster import Cluster
    from celery_cluster.settings import resolve

    with caplog.at_level(logging.WARNING, logger="celery_cluster"):
        settings = resolve({}, {"cluster_nodes": "127.0.0.1:1,127.0.0.1:2", "cluster_listen": "127.0.0.1:1"}, {})
        assert settings is not None
        cluster = Cluster(settings.membership, listen=settings.listen, timing=settings.timing,
                          state_dir=tmp_path)
        try:
            assert cluster.members == ("127.0.0.1:1", "127.0.0.1:2") and cluster.timing is settings.timing
        finally:
            cluster.stop(transfer=False)
    assert len([r for r in caplog.records if "even number" in r.getMessage()]) == 1


def test_cluster_refuses_timing_given_twice(tmp_path) -> None:
    from celery_cluster import Cluster

    with pytest.raises(ConfigurationError, match="give timing= or"):
        Cluster(["h:1"], advertise="h:1", state_dir=tmp_path, timing=Timing(), heartbeat_interval=0.1)
    with pytest.raises(ConfigurationError, match="disagrees with the membership"):
        Cluster(Membership.parse("h:1,h:2,h:3", "h:1"), advertise="h:2", state_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was written


# --- parse_timeout_range -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.0-2.0", (1.0, 2.0)),
        ("1-2", (1.0, 2.0)),
        (" 0.15 - 0.3 ", (0.15, 0.3)),
        (".5-1.", (0.5, 1.0)),
        ("1.5", (1.5, 3.0)),
        ("2", (2.0, 4.0)),
        ((1.0, 2.0), (1.0, 2.0)),
        ([1, 2], (1.0, 2.0)),
        (("0.5", "0.75"), (0.5, 0.75)),
        (1.5, (1.5, 3.0)),
        (3, (3.0, 6.0)),
    ],
)
def test_parse_timeout_range_accepts(value: object, expected: tuple[float, float]) -> None:
    result = parse_timeout_range(value)  # type: ignore[arg-type]
    assert result == expected
    assert all(type(x) is float for x in result)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "fast",
        "1-",
        "-1",
        "-1-2",
        "1--2",
        "1-2-3",
        "1..2",
        "1,2",
        "1 2",
        "1e3",
        "nan",
        "inf",
        "1-inf",
        (1.0,),
        (1.0, 2.0, 3.0),
        [],
        ("a", "b"),
        (True, 2),
        (1.0, float("nan")),
        (1.0, float("inf")),
        None,
        True,
        {"min": 1},
    ],
)
def test_parse_timeout_range_refuses_malformed(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_timeout_range(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["0-1", "0", (0, 1), (-1.0, 2.0), 0.0])
def test_parse_timeout_range_refuses_non_positive_minimum(value: object) -> None:
    with pytest.raises(ConfigurationError, match="minimum must be more than 0") as info:
        parse_timeout_range(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["2-1", "1-1", (2.0, 2.0), [3, 1]])
def test_parse_timeout_range_refuses_max_not_above_min(value: object) -> None:
    with pytest.raises(ConfigurationError, match="maximum .* must be greater than the minimum") as info:
        parse_timeout_range(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


# --- Timing --------------------------------------------------------------------------


def test_timing_defaults() -> None:
    timing = Timing()
    assert timing.election_timeout == (1.0, 2.0)
    assert timing.heartbeat_interval == 0.1
    assert timing.max_clock_drift == 0.05
    assert timing.rpc_timeout == pytest.approx(0.5)


def test_timing_is_frozen_and_hashable() -> None:
    timing = Timing()
    with pytest.raises(dataclasses.FrozenInstanceError):
        timing.heartbeat_interval = 1.0  # type: ignore[misc]
    assert hash(timing) == hash(Timing())


def test_timing_normalises_election_timeout() -> None:
    assert Timing(election_timeout="2-4").election_timeout == (2.0, 4.0)  # type: ignore[arg-type]
    assert Timing(election_timeout=[1, 3]).election_timeout == (1.0, 3.0)  # type: ignore[arg-type]
    assert Timing(election_timeout=(1, 2)) == Timing()


def test_timing_refuses_bad_election_timeout() -> None:
    with pytest.raises(ConfigurationError, match="invalid election timeout '2-1'"):
        Timing(election_timeout="2-1")  # type: ignore[arg-type]


@pytest.mark.parametrize("heartbeat", [0, 0.0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_timing_refuses_non_positive_heartbeat(heartbeat: object) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat interval") as info:
        Timing(heartbeat_interval=heartbeat)  # type: ignore[arg-type]
    assert repr(heartbeat) in str(info.value)


def test_timing_heartbeat_at_most_a_quarter_of_min_timeout() -> None:
    assert Timing(election_timeout=(1.0, 2.0), heartbeat_interval=0.25).heartbeat_interval == 0.25
    with pytest.raises(ConfigurationError) as info:
        Timing(election_timeout=(1.0, 2.0), heartbeat_interval=0.5)
    assert str(info.value) == (
        "heartbeat interval 0.5 s must be at most a quarter of the minimum election timeout 1.0 s "
        "(raise the timeout or lower the interval)"
    )


def test_timing_heartbeat_check_uses_the_minimum_timeout() -> None:
    # 0.3 s fits a quarter of the maximum (4.0) but not of the minimum (1.0).
    with pytest.raises(ConfigurationError, match="minimum election timeout 1.0 s"):
        Timing(election_timeout=(1.0, 4.0), heartbeat_interval=0.3)


@pytest.mark.parametrize("drift", [0, 0.0, 0.05, 0.49])
def test_timing_accepts_drift(drift: float) -> None:
    assert Timing(max_clock_drift=drift).max_clock_drift == drift


@pytest.mark.parametrize("drift", [-0.01, 0.5, 1, float("nan"), float("inf"), True, "0.05", None])
def test_timing_refuses_drift(drift: object) -> None:
    with pytest.raises(ConfigurationError, match="max clock drift") as info:
        Timing(max_clock_drift=drift)  # type: ignore[arg-type]
    assert repr(drift) in str(info.value)


@pytest.mark.parametrize(
    ("election_timeout", "heartbeat", "expected"),
    [
        ((1.0, 2.0), 0.1, 0.5),  # 5 heartbeats
        ((1.0, 2.0), 0.001, 0.05),  # floor
        ((0.1, 0.2), 0.005, 0.05),  # floor, still below half the timeout
        ((0.06, 0.12), 0.005, 0.03),  # half the minimum timeout caps even the floor
        ((1.0, 2.0), 0.25, 0.5),  # 1.25 capped at half the minimum timeout
        ((10.0, 20.0), 1.0, 5.0),  # 5 heartbeats == the cap
    ],
)
def test_timing_rpc_timeout(election_timeout: tuple[float, float], heartbeat: float, expected: float) -> None:
    timing = Timing(election_timeout=election_timeout, heartbeat_interval=heartbeat)
    assert timing.rpc_timeout == pytest.approx(expected)
    assert timing.rpc_timeout <= timing.election_timeout[0] / 2


# --- default_state_dir -----------------------------------------------------------------


def test_default_state_dir_uses_xdg_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir("127.0.0.1:8899") == tmp_path / "celery-cluster" / "127.0.0.1_8899"


def test_default_state_dir_falls_back_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".local" / "state" / "celery-cluster" / "127.0.0.1_8899"
    assert default_state_dir("127.0.0.1:8899") == expected


@pytest.mark.parametrize("xdg", ["", "relative/dir"])
def test_default_state_dir_ignores_empty_or_relative_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str
) -> None:
    # The XDG spec says relative paths in XDG_* variables are invalid and must be ignored.
    monkeypatch.setenv("XDG_STATE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir("h:1") == tmp_path / ".local" / "state" / "celery-cluster" / "h_1"


@pytest.mark.parametrize(
    ("advertise", "name"),
    [
        ("127.0.0.1:8899", "127.0.0.1_8899"),
        ("[::1]:8899", "___1__8899"),  # [ : : 1 ] : -> one _ each
        ("Worker-1.example:80", "worker-1.example_80"),
        ("w_1:2", "w_1_2"),
        (" h:1 ", "h_1"),
    ],
)
def test_default_state_dir_safe_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, advertise: str, name: str
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = default_state_dir(advertise)
    assert path.name == name
    assert path.parent == tmp_path / "celery-cluster"


def test_default_state_dir_distinct_per_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    addresses = ("127.0.0.1:8899", "127.0.0.1:8898", "[::1]:8899", "localhost:8899")
    names = {default_state_dir(a) for a in addresses}
    assert len(names) == 4


def test_default_state_dir_refuses_bad_address(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with pytest.raises(ConfigurationError, match="invalid node address '../x'"):
        default_state_dir("../x")


def test_default_state_dir_does_no_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "missing"))
    default_state_dir("h:1")
    assert not (tmp_path / "missing").exists()


def test_default_state_dir_is_kept_apart_per_role(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A standalone node and a worker (or two apps) on one address never share a vote."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    node, worker, other = (default_state_dir("127.0.0.1:8899", role)
                           for role in ("node", "worker-proj", "worker-other app"))
    assert node == tmp_path / "celery-cluster" / "node" / "127.0.0.1_8899"
    assert worker == tmp_path / "celery-cluster" / "worker-proj" / "127.0.0.1_8899"
    assert other.parent.name == "worker-other_app"
    assert len({node, worker, other}) == 3


def test_a_state_directory_of_an_earlier_release_is_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    earlier = tmp_path / "celery-cluster" / "127.0.0.1_8899"
    earlier.mkdir(parents=True)
    (earlier / "state.json").write_text("{}")
    # Captured on the logger itself: a Celery worker set up earlier in the session (the
    # celery.contrib.pytest fixtures) may have disabled or re-levelled existing loggers.
    logger = logging.getLogger("celery_cluster")
    saved = logger.disabled, logger.level
    logger.disabled = False
    logger.setLevel(logging.WARNING)
    logger.addHandler(caplog.handler)
    try:
        assert default_state_dir("127.0.0.1:8899", "node") == earlier  # its term and vote are not dropped
    finally:
        logger.removeHandler(caplog.handler)
        logger.disabled, logger.level = saved
    assert "an earlier release made" in caplog.text
