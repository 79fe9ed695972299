"""Secret references: ``env:NAME`` and ``file:PATH``, resolved at load, never shown.

Where references may point (``SecretPolicy``) is tested in test_secret_policy.py; here the
policy allows ``tmp_path`` and the default ``SAFOUS_SECRET_`` prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.rules.secrets import MASK, SecretError, SecretPolicy, is_reference, mask, resolve_secret

SECRET = "s3cr3t-value"


@pytest.fixture
def policy(tmp_path: Path) -> SecretPolicy:
    return SecretPolicy((str(tmp_path),))


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", ""),
    ("plain password", "plain password"),
    ("Env:NOT_A_REFERENCE", "Env:NOT_A_REFERENCE"),  # prefixes are case-sensitive
    ("environment", "environment"),
])
def test_clear_values_are_themselves(value: str | None, expected: str | None) -> None:
    assert resolve_secret(value, SecretPolicy()) == expected


def test_env_reference(monkeypatch: pytest.MonkeyPatch, policy: SecretPolicy) -> None:
    monkeypatch.setenv("SAFOUS_SECRET_TEST", SECRET)
    assert resolve_secret("env:SAFOUS_SECRET_TEST", policy) == SECRET


def test_env_reference_to_empty_variable(monkeypatch: pytest.MonkeyPatch, policy: SecretPolicy) -> None:
    monkeypatch.setenv("SAFOUS_SECRET_TEST_EMPTY", "")
    assert resolve_secret("env:SAFOUS_SECRET_TEST_EMPTY", policy) == ""


@pytest.mark.parametrize(("contents", "expected"), [
    (b"s3cr3t\n", "s3cr3t"),
    (b"s3cr3t\r\n", "s3cr3t"),
    (b"s3cr3t", "s3cr3t"),
    (b"s3cr3t\n\n", "s3cr3t\n"),  # one newline only
    (b" spaced \n", " spaced "),
    ("pässwörd\n".encode(), "pässwörd"),
    (b"", ""),
])
def test_file_reference(tmp_path: Path, policy: SecretPolicy, contents: bytes, expected: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(contents)
    assert resolve_secret(f"file:{path}", policy) == expected


def test_relative_file_reference_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           policy: SecretPolicy) -> None:
    # Relative to the working directory, which is not where a secret directory is configured.
    (tmp_path / "client_secret").write_text(SECRET + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SecretError) as caught:
        resolve_secret("file:client_secret", policy)
    assert str(caught.value) == ("secret file:client_secret: the path is relative: use an absolute path "
                                 f"under a secret directory (--secret-dir {tmp_path})")


def test_missing_env_var(monkeypatch: pytest.MonkeyPatch, policy: SecretPolicy) -> None:
    monkeypatch.delenv("SAFOUS_SECRET_TEST_UNSET", raising=False)
    with pytest.raises(SecretError) as caught:
        resolve_secret("env:SAFOUS_SECRET_TEST_UNSET", policy)
    assert str(caught.value) == ("secret env:SAFOUS_SECRET_TEST_UNSET: environment variable "
                                 "SAFOUS_SECRET_TEST_UNSET is not set")
    assert caught.value.reference == "env:SAFOUS_SECRET_TEST_UNSET"
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("reference", "message"), [
    ("env:", "secret env:: the environment variable name is missing"),
    ("file:", "secret file:: the file path is missing"),
])
def test_empty_reference(reference: str, message: str) -> None:
    with pytest.raises(SecretError, match=f"^{message}$"):
        resolve_secret(reference, SecretPolicy())


def test_missing_file(tmp_path: Path, policy: SecretPolicy) -> None:
    path = tmp_path / "absent"
    with pytest.raises(SecretError) as caught:
        resolve_secret(f"file:{path}", policy)
    assert str(caught.value) == f"secret file:{path}: cannot read the file (No such file or directory)"


def test_directory_is_unreadable(tmp_path: Path, policy: SecretPolicy) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(SecretError, match="cannot read the file"):
        resolve_secret(f"file:{tmp_path / 'sub'}", policy)


def test_non_utf8_file_does_not_leak_bytes(tmp_path: Path, policy: SecretPolicy) -> None:
    path = tmp_path / "binary"
    path.write_bytes(b"abc\xff\xfe")
    with pytest.raises(SecretError) as caught:
        resolve_secret(f"file:{path}", policy)
    assert str(caught.value) == f"secret file:{path}: the file is not UTF-8 text"
    assert caught.value.__cause__ is None and caught.value.__context__ is not None
    assert "xff" not in str(caught.value)


def test_huge_file_is_refused(tmp_path: Path, policy: SecretPolicy) -> None:
    path = tmp_path / "huge"
    path.write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(SecretError, match="larger than 64 KiB"):
        resolve_secret(f"file:{path}", policy)


def test_errors_never_hold_the_secret(tmp_path: Path, policy: SecretPolicy) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET.encode() + b"\xff")
    with pytest.raises(SecretError) as caught:
        resolve_secret(f"file:{path}", policy)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


@pytest.mark.parametrize(("value", "reference"), [
    ("env:X", True), ("file:/run/secrets/x", True), ("env:", True), ("password", False),
    ("", False), (None, False), ("ENV:X", False), (" env:X", False),
])
def test_is_reference(value: str | None, reference: bool) -> None:
    assert is_reference(value) is reference


@pytest.mark.parametrize(("value", "shown"), [
    ("env:OAUTH_SECRET", "env:OAUTH_SECRET"),
    ("file:/run/secrets/oauth", "file:/run/secrets/oauth"),
    ("hunter2", MASK),
    ("a much longer clear secret value", MASK),
    ("", MASK),
    (None, ""),
])
def test_mask(value: str | None, shown: str) -> None:
    assert mask(value) == shown
    assert MASK == "••••••"
