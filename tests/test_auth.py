"""Request signing: round trip, tampering, clock skew, header casing, secret loading."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from werkzeug.datastructures import Headers

from celery_cluster.auth import (
    SECRET_ENV_VAR,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Signer,
    load_secret,
)
from celery_cluster.errors import AuthenticationError, ConfigurationError

NOW = 1_700_000_000.0
SECRET = b"s3cret-shared-by-all-nodes"
PATH = "/cluster/appendentries"
SENDER = "http://10.0.0.1:7000"
BODY = b'{"term": 3, "leader": "http://10.0.0.1:7000"}'


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_signer(secret: bytes | str = SECRET, clock: FakeClock | None = None) -> Signer:
    return Signer(secret, clock=clock or FakeClock())


def signed() -> dict[str, str]:
    return make_signer().sign("POST", PATH, SENDER, BODY)


# --- round trip ----------------------------------------------------------------------


def test_round_trip_returns_sender() -> None:
    signer = make_signer()
    headers = signer.sign("POST", PATH, SENDER, BODY)
    assert set(headers) == {SENDER_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER}
    assert headers[SENDER_HEADER] == SENDER
    assert headers[TIMESTAMP_HEADER] == "1700000000.000"
    assert signer.verify("POST", PATH, headers, BODY) == SENDER


def test_signature_matches_the_documented_canonical_string() -> None:
    # Pins the wire format: other implementations must be able to reproduce it.
    headers = signed()
    message = b"POST\n" + PATH.encode() + b"\n1700000000.000\n" + SENDER.encode() + b"\n" + BODY
    assert headers[SIGNATURE_HEADER] == hmac.new(SECRET, message, hashlib.sha256).hexdigest()


def test_method_is_case_insensitive() -> None:
    headers = make_signer().sign("post", PATH, SENDER, BODY)
    assert make_signer().verify("POST", PATH, headers, BODY) == SENDER


def test_empty_body_round_trips() -> None:
    headers = make_signer().sign("GET", "/cluster/status", SENDER, b"")
    assert make_signer().verify("GET", "/cluster/status", headers, b"") == SENDER


def test_str_and_bytes_secrets_are_equivalent() -> None:
    headers = make_signer("s3cret").sign("POST", PATH, SENDER, BODY)
    assert make_signer(b"s3cret").verify("POST", PATH, headers, BODY) == SENDER


def test_timestamp_with_fewer_decimals_is_accepted() -> None:
    # "up to 3 decimals": an integer timestamp from another implementation must verify.
    message = b"POST\n" + PATH.encode() + b"\n1700000000\n" + SENDER.encode() + b"\n" + BODY
    headers = {
        SENDER_HEADER: SENDER,
        TIMESTAMP_HEADER: "1700000000",
        SIGNATURE_HEADER: hmac.new(SECRET, message, hashlib.sha256).hexdigest(),
    }
    assert make_signer().verify("POST", PATH, headers, BODY) == SENDER


# --- tampering -----------------------------------------------------------------------


def test_tampered_method_fails() -> None:
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("PUT", PATH, signed(), BODY)


def test_tampered_path_fails() -> None:
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", "/cluster/requestvote", signed(), BODY)


def test_tampered_timestamp_fails() -> None:
    headers = signed()
    headers[TIMESTAMP_HEADER] = "1700000001.000"  # still within the skew window
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", PATH, headers, BODY)


def test_tampered_sender_fails() -> None:
    headers = signed()
    headers[SENDER_HEADER] = "http://10.0.0.2:7000"
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", PATH, headers, BODY)


def test_tampered_body_fails() -> None:
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", PATH, signed(), BODY.replace(b"3", b"4"))


def test_tampered_signature_fails() -> None:
    headers = signed()
    sig = headers[SIGNATURE_HEADER]
    headers[SIGNATURE_HEADER] = ("0" if sig[0] != "0" else "1") + sig[1:]
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", PATH, headers, BODY)


def test_non_hex_signature_fails_cleanly() -> None:
    headers = signed()
    headers[SIGNATURE_HEADER] = "é" * 64  # compare_digest would raise TypeError on non-ASCII str
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", PATH, headers, BODY)


def test_moving_bytes_between_sender_and_body_fails() -> None:
    # "a" + body "x\ny" and "a\nx" + body "y" have the same canonical bytes.
    signer = make_signer()
    headers = signer.sign("POST", PATH, "a", b"x\ny")
    headers[SENDER_HEADER] = "a\nx"
    with pytest.raises(AuthenticationError):
        signer.verify("POST", PATH, headers, b"y")


def test_wrong_secret_fails() -> None:
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer(b"another secret").verify("POST", PATH, signed(), BODY)


# --- missing / malformed headers -----------------------------------------------------


@pytest.mark.parametrize("name", [SENDER_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_missing_header_fails(name: str) -> None:
    headers = signed()
    del headers[name]
    with pytest.raises(AuthenticationError, match="missing signature headers"):
        make_signer().verify("POST", PATH, headers, BODY)


@pytest.mark.parametrize("name", [SENDER_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_empty_header_counts_as_missing(name: str) -> None:
    headers = signed()
    headers[name] = ""
    with pytest.raises(AuthenticationError, match="missing signature headers"):
        make_signer().verify("POST", PATH, headers, BODY)


def test_no_headers_at_all_fails() -> None:
    with pytest.raises(AuthenticationError, match="missing signature headers"):
        make_signer().verify("POST", PATH, {}, BODY)


@pytest.mark.parametrize(
    "timestamp",
    ["abc", "nan", "inf", "-1700000000", "1.7e9", "1700000000.1234", "1700000000.", ".5", "0x10", "١٢٣"],
)
def test_malformed_timestamp_fails(timestamp: str) -> None:
    headers = signed()
    headers[TIMESTAMP_HEADER] = timestamp
    with pytest.raises(AuthenticationError, match="malformed timestamp"):
        make_signer().verify("POST", PATH, headers, BODY)


# --- clock skew ----------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-30.0, -29.999, -1.0, 0.0, 1.0, 29.999, 30.0])
def test_timestamp_within_skew_passes(offset: float) -> None:
    headers = make_signer(clock=FakeClock(NOW + offset)).sign("POST", PATH, SENDER, BODY)
    assert make_signer(clock=FakeClock(NOW)).verify("POST", PATH, headers, BODY) == SENDER


@pytest.mark.parametrize("offset", [-30.001, -31.0, -3600.0, 30.001, 31.0, 3600.0])
def test_stale_or_future_timestamp_fails(offset: float) -> None:
    # Negative offset: the request was signed in the past (stale / replayed);
    # positive: signed by a clock running ahead (future).
    headers = make_signer(clock=FakeClock(NOW + offset)).sign("POST", PATH, SENDER, BODY)
    with pytest.raises(AuthenticationError, match="timestamp outside the allowed ±30 s clock skew"):
        make_signer(clock=FakeClock(NOW)).verify("POST", PATH, headers, BODY)


def test_replay_fails_once_the_window_has_passed() -> None:
    clock = FakeClock()
    signer = make_signer(clock=clock)
    headers = signer.sign("POST", PATH, SENDER, BODY)
    assert signer.verify("POST", PATH, headers, BODY) == SENDER
    clock.now += 31
    with pytest.raises(AuthenticationError, match="clock skew"):
        signer.verify("POST", PATH, headers, BODY)


def test_custom_max_skew_is_honoured_and_reported() -> None:
    headers = make_signer(clock=FakeClock(NOW - 10)).sign("POST", PATH, SENDER, BODY)
    strict = Signer(SECRET, max_skew=5, clock=FakeClock())
    with pytest.raises(AuthenticationError, match="±5 s"):
        strict.verify("POST", PATH, headers, BODY)


def test_forged_stale_request_reports_bad_signature_not_skew() -> None:
    # The skew diagnosis is only for genuine peers.
    headers = make_signer(b"wrong", clock=FakeClock(NOW - 3600)).sign("POST", PATH, SENDER, BODY)
    with pytest.raises(AuthenticationError, match="bad signature"):
        make_signer().verify("POST", PATH, headers, BODY)


# --- header case-insensitivity -------------------------------------------------------


@pytest.mark.parametrize("transform", [str.lower, str.upper, str.swapcase])
def test_plain_dict_with_any_casing(transform) -> None:
    headers = {transform(k): v for k, v in signed().items()}
    assert make_signer().verify("POST", PATH, headers, BODY) == SENDER


def test_werkzeug_headers() -> None:
    headers = Headers()
    for name, value in signed().items():
        headers.add(name.lower(), value)
    assert make_signer().verify("POST", PATH, headers, BODY) == SENDER


def test_uppercase_hex_signature_is_accepted() -> None:
    headers = signed()
    headers[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER].upper()
    assert make_signer().verify("POST", PATH, headers, BODY) == SENDER


# --- Signer configuration ------------------------------------------------------------


@pytest.mark.parametrize("secret", [b"", ""])
def test_empty_secret_is_a_configuration_error(secret: bytes | str) -> None:
    with pytest.raises(ConfigurationError):
        Signer(secret)


@pytest.mark.parametrize("max_skew", [0, -1, float("nan"), float("inf")])
def test_bad_max_skew_is_a_configuration_error(max_skew: float) -> None:
    with pytest.raises(ConfigurationError):
        Signer(SECRET, max_skew=max_skew)


@pytest.mark.parametrize("sender", ["", "a\nb", "a\rb", "nodé"])
def test_sign_rejects_unsignable_sender(sender: str) -> None:
    with pytest.raises(ConfigurationError):
        make_signer().sign("POST", PATH, sender, BODY)


def test_repr_hides_the_secret() -> None:
    assert "s3cret" not in repr(make_signer())


# --- load_secret ---------------------------------------------------------------------


def test_nothing_configured_returns_none() -> None:
    assert load_secret(env={}) is None


def test_env_var_is_used() -> None:
    assert load_secret(env={SECRET_ENV_VAR: "from-env"}) == b"from-env"


def test_secret_file_beats_env(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    assert load_secret(secret_file=path, env={SECRET_ENV_VAR: "from-env"}) == b"from-file"


def test_explicit_secret_beats_file_and_env(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file")
    assert load_secret(secret="explicit", secret_file=path, env={SECRET_ENV_VAR: "e"}) == b"explicit"
    assert load_secret(secret=b"raw", env={}) == b"raw"


def test_explicit_secret_skips_a_broken_file(tmp_path) -> None:
    # The file is not even opened when an explicit secret is given.
    assert load_secret(secret="explicit", secret_file=tmp_path / "missing", env={}) == b"explicit"


def test_secret_file_whitespace_is_stripped(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"  \n top secret \r\n\n")
    assert load_secret(secret_file=str(path), env={}) == b"top secret"


def test_missing_secret_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "does-not-exist"
    with pytest.raises(ConfigurationError, match="does-not-exist"):
        load_secret(secret_file=path, env={SECRET_ENV_VAR: "from-env"})


def test_unreadable_secret_file_names_the_file(tmp_path) -> None:
    # A directory is unreadable as a file regardless of the user running the tests (root too).
    with pytest.raises(ConfigurationError, match=str(tmp_path.name)):
        load_secret(secret_file=tmp_path, env={})


@pytest.mark.parametrize("content", [b"", b"\n", b"  \r\n\t "])
def test_empty_secret_file_names_the_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "empty-secret"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError, match="empty-secret"):
        load_secret(secret_file=path, env={SECRET_ENV_VAR: "from-env"})


def test_empty_explicit_secret_is_an_error() -> None:
    with pytest.raises(ConfigurationError):
        load_secret(secret="", env={})


def test_empty_env_var_is_an_error_not_off() -> None:
    with pytest.raises(ConfigurationError, match=SECRET_ENV_VAR):
        load_secret(env={SECRET_ENV_VAR: ""})


def test_loaded_secret_works_with_signer(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_text("shared\n")
    a = Signer(load_secret(secret_file=path, env={}), clock=FakeClock())
    b = Signer(load_secret(env={SECRET_ENV_VAR: "shared"}), clock=FakeClock())
    assert b.verify("POST", PATH, a.sign("POST", PATH, SENDER, BODY), BODY) == SENDER
