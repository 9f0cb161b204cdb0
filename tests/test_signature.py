"""X-Hub-Signature-256 verification on raw bytes: the WEBHOOK.md worked example, header format, rotation."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.signature import sign, verify_signature

DATA = Path(__file__).parent / "data" / "webhook"
EXAMPLE_SECRET = "acceptance-app-secret-0001"
EXAMPLE_HEADER = "sha256=cec7948a4e436db36ddb10c499f309c31ea80459c171e859b1b942803b74e7a4"


@pytest.fixture
def example_body() -> bytes:
    return (DATA / "signature_example.json").read_bytes()


def test_worked_example_from_webhook_md(example_body: bytes) -> None:
    assert len(example_body) == 351
    assert not example_body.endswith(b"\n")
    assert sign(example_body, EXAMPLE_SECRET) == EXAMPLE_HEADER
    assert verify_signature(example_body, EXAMPLE_HEADER, [EXAMPLE_SECRET])


def test_uppercase_hex_is_accepted(example_body: bytes) -> None:
    upper = "sha256=" + EXAMPLE_HEADER.removeprefix("sha256=").upper()
    assert verify_signature(example_body, upper, [EXAMPLE_SECRET])


def test_wrong_secret_or_changed_body_is_rejected(example_body: bytes) -> None:
    assert not verify_signature(example_body, EXAMPLE_HEADER, ["another-secret"])
    assert not verify_signature(example_body.replace(b'"hi"', b'"ho"'), EXAMPLE_HEADER, [EXAMPLE_SECRET])
    assert not verify_signature(example_body + b"\n", EXAMPLE_HEADER, [EXAMPLE_SECRET])


def test_reserialized_body_does_not_verify() -> None:
    # Meta signs bytes with \uXXXX escapes; re-serializing the parsed JSON gives other bytes.
    raw = (DATA / "text_escaped.json").read_bytes()
    header = sign(raw, EXAMPLE_SECRET)
    reserialized = json.dumps(json.loads(raw), ensure_ascii=False).encode()
    assert verify_signature(raw, header, [EXAMPLE_SECRET])
    assert not verify_signature(reserialized, header, [EXAMPLE_SECRET])


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha256",
        EXAMPLE_HEADER[:-1],
        EXAMPLE_HEADER + "0",
        EXAMPLE_HEADER[:-1] + "g",
        "SHA256=" + EXAMPLE_HEADER.removeprefix("sha256="),
        " " + EXAMPLE_HEADER,
        EXAMPLE_HEADER + " ",
        EXAMPLE_HEADER + "\n",
        EXAMPLE_HEADER.removeprefix("sha256="),
        "sha1=" + hashlib.sha1(b"x").hexdigest(),
        "sha256=" + "\uff10" * 64,  # full-width digits are not hex
    ],
    ids=repr,
)
def test_malformed_header_is_rejected(example_body: bytes, header: str | None) -> None:
    assert not verify_signature(example_body, header, [EXAMPLE_SECRET])


def test_sha1_signature_alone_is_rejected(example_body: bytes) -> None:
    sha1 = "sha1=" + hmac.new(EXAMPLE_SECRET.encode(), example_body, hashlib.sha1).hexdigest()
    assert not verify_signature(example_body, sha1, [EXAMPLE_SECRET])


def test_empty_secret_never_matches(example_body: bytes) -> None:
    empty_key_header = "sha256=" + hmac.new(b"", example_body, hashlib.sha256).hexdigest()
    assert not verify_signature(example_body, empty_key_header, [""])
    assert not verify_signature(example_body, empty_key_header, [])
    assert not verify_signature(example_body, EXAMPLE_HEADER, [])
    with pytest.raises(ValueError, match="empty app secret"):
        sign(example_body, "")


def test_rotation_accepts_every_configured_secret(example_body: bytes) -> None:
    secrets = ["", "new-secret-0002", EXAMPLE_SECRET]
    assert verify_signature(example_body, EXAMPLE_HEADER, secrets)
    assert verify_signature(example_body, sign(example_body, "new-secret-0002"), secrets)
    assert not verify_signature(example_body, sign(example_body, "retired-secret"), secrets)


def test_a_lone_string_is_one_secret_not_one_per_character(example_body: bytes) -> None:
    assert verify_signature(example_body, EXAMPLE_HEADER, EXAMPLE_SECRET)
    assert not verify_signature(example_body, sign(example_body, "a"), EXAMPLE_SECRET)


def test_non_ascii_secret_is_keyed_as_utf8() -> None:
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    expected = "sha256=" + hmac.new("s\u00e9cr\u00e8t".encode(), body, hashlib.sha256).hexdigest()
    assert sign(body, "s\u00e9cr\u00e8t") == expected
    assert verify_signature(body, expected, ["s\u00e9cr\u00e8t"])


@given(body=st.binary(max_size=512), secret=st.text(min_size=1, max_size=40), flip=st.integers(0, 511))
def test_sign_then_verify_roundtrip(body: bytes, secret: str, flip: int) -> None:
    header = sign(body, secret)
    assert verify_signature(body, header, [secret])
    if body:
        i = flip % len(body)
        tampered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        assert not verify_signature(tampered, header, [secret])
