"""Where secret references may point: ``file:`` under ``--secret-dir``, ``env:`` with
``--secret-env-prefix``. Refused by the admin script when a rule is written, ``rule_invalid`` in
the sidecar when it is loaded; neither ever reads a file or a variable outside those places."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.policies import Policy
from sidecar.rules.model import AuthType, Rule
from sidecar.rules.secrets import SecretError, SecretPolicy, parse_secret_dirs, resolve_secret
from sidecar.settings import Settings
from tests.admin_cli import admin, count, refused, stored_rules
from tests.conftest import Webhook, answer, check_request, denial_reason, seed
from tests.helpers import ROOT, code_of, start_server

SECRET = "s3cr3t-in-the-dir"
OUTSIDE = "outside-secret-never-read"
DEFAULT_DIR = "/var/run/secrets/safous"


def outside(ref: str, dirs: str = DEFAULT_DIR) -> str:
    return (f"secret {ref}: not under a secret directory (--secret-dir {dirs}); put the file there or "
            "add its directory with --secret-dir / SAFOUS_SECRET_DIR")


def not_prefixed(ref: str, prefix: str = "SAFOUS_SECRET_") -> str:
    return (f"secret {ref}: only variables whose names start with {prefix} may be read "
            "(--secret-env-prefix / SAFOUS_SECRET_ENV_PREFIX); give the secret to the sidecar under such a name")


def escaped(ref: str, dirs: str) -> str:
    return (f"secret {ref}: its real path (symbolic links resolved) is not under a secret directory "
            f"(--secret-dir {dirs}); put the file there or add its directory with --secret-dir / SAFOUS_SECRET_DIR")


# ------------------------------------------------------------------ the policy, no I/O

@pytest.mark.parametrize(("value", "problem"), [
    (None, None),
    ("clear password", None),
    ("env:SAFOUS_SECRET_PW", None),
    ("env:SAFOUS_SECRET_", None),  # the prefix alone is a name that starts with it
    (f"file:{DEFAULT_DIR}/pw", None),
    (f"file:{DEFAULT_DIR}/sub/pw", None),
    (f"file:{DEFAULT_DIR}/..data/pw", None),  # a kubelet secret volume's link, not a parent
    (f"file:{DEFAULT_DIR}//pw", None),
    (f"file:{DEFAULT_DIR}/sub/../pw", None),
    ("env:PATH", not_prefixed("env:PATH")),
    ("env:HOME", not_prefixed("env:HOME")),
    ("env:SAFOUS_DB", not_prefixed("env:SAFOUS_DB")),
    ("env:safous_secret_pw", not_prefixed("env:safous_secret_pw")),  # names are case-sensitive
    ("env:1X", "secret env:1X: env:NAME needs an environment variable name (letters, digits and _, "
               "not first a digit)"),
    ("env:", "secret env:: the environment variable name is missing"),
    ("file:", "secret file:: the file path is missing"),
    ("file:/etc/passwd", outside("file:/etc/passwd")),
    (f"file:{DEFAULT_DIR}", outside(f"file:{DEFAULT_DIR}")),  # the directory itself
    (f"file:{DEFAULT_DIR}/../../../etc/passwd", outside(f"file:{DEFAULT_DIR}/../../../etc/passwd")),
    (f"file:{DEFAULT_DIR}-other/pw", outside(f"file:{DEFAULT_DIR}-other/pw")),  # a sibling sharing the prefix
    ("file:/var/run/secrets/kubernetes.io/serviceaccount/token",
     outside("file:/var/run/secrets/kubernetes.io/serviceaccount/token")),
    ("file:pw", f"secret file:pw: the path is relative: use an absolute path under a secret directory "
                f"(--secret-dir {DEFAULT_DIR})"),
    ("file:/var/run/secrets/safous/a\0b", "secret file:/var/run/secrets/safous/a\0b: the file path holds a NUL "
                                          "character"),
])
def test_the_default_policy(value: str | None, problem: str | None) -> None:
    policy = SecretPolicy()
    assert policy == SecretPolicy((DEFAULT_DIR,), "SAFOUS_SECRET_")
    if problem is None:
        policy.check(value)
    else:
        with pytest.raises(SecretError) as caught:
            policy.check(value)
        assert str(caught.value) == problem


def test_several_directories_and_another_prefix() -> None:
    policy = SecretPolicy(("/etc/app-secrets", "/run/vault"), "APP_")
    policy.check("file:/run/vault/token")
    policy.check("file:/etc/app-secrets/pw")
    policy.check("env:APP_PW")
    with pytest.raises(SecretError) as caught:
        policy.check("file:/etc/passwd")
    assert str(caught.value) == outside("file:/etc/passwd", "/etc/app-secrets --secret-dir /run/vault")
    with pytest.raises(SecretError) as caught:
        policy.check("env:SAFOUS_SECRET_PW")
    assert str(caught.value) == not_prefixed("env:SAFOUS_SECRET_PW", "APP_")


def test_no_directory_turns_file_references_off() -> None:
    with pytest.raises(SecretError) as caught:
        SecretPolicy(()).check(f"file:{DEFAULT_DIR}/pw")
    assert str(caught.value) == (f"secret file:{DEFAULT_DIR}/pw: not under a secret directory: file: references "
                                 "are off, no secret directory is set; add the file's directory with "
                                 "--secret-dir / SAFOUS_SECRET_DIR")


@pytest.mark.parametrize(("values", "dirs"), [
    ("/a", ("/a",)),
    ("/a:/b/../c", ("/a", "/c")),
    ("/a::/b:", ("/a", "/b")),
    ("", ()),
    (["/a", "/b:/c/"], ("/a", "/b", "/c")),
    (["/a", "/a/"], ("/a",)),
])
def test_secret_dirs_are_a_path_like_list(values: str | list[str], dirs: tuple[str, ...]) -> None:
    assert parse_secret_dirs(values) == dirs


@pytest.mark.parametrize("values", ["rel", "/a:rel", ["/a", "./b"]])
def test_secret_dirs_must_be_absolute(values: str | list[str]) -> None:
    with pytest.raises(ValueError, match="is not an absolute path"):
        parse_secret_dirs(values)


@pytest.mark.parametrize("prefix", ["", "1X", "A-B", "A B"])
def test_an_env_prefix_no_variable_name_starts_with_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="must be the start of a variable name"):
        SecretPolicy(env_prefix=prefix)


# ------------------------------------------------------------- resolving, on a real disk

@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    """A secret directory holding ``pw``, next to a file that must never be read."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text(SECRET + "\n")
    (tmp_path / "outside").write_text(OUTSIDE + "\n")
    return tmp_path / "secrets"


def kubelet_volume(mount: Path, files: dict[str, str]) -> None:
    """The layout the kubelet writes for a secret volume: the files in a timestamped directory,
    ``..data`` linking to it (swapped atomically on update), each name linking through ``..data``."""
    mount.mkdir(parents=True, exist_ok=True)
    stamp = mount / "..2024_05_01_10_00_00.123456789"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to(stamp.name)


def test_a_file_under_the_directory(secret_dir: Path) -> None:
    assert resolve_secret(f"file:{secret_dir / 'pw'}", SecretPolicy((str(secret_dir),))) == SECRET


def test_a_kubelet_secret_volume(tmp_path: Path) -> None:
    mount = tmp_path / "var" / "run" / "secrets" / "safous"
    kubelet_volume(mount, {"password": SECRET + "\n", "client-secret": "cs\n"})
    policy = SecretPolicy((str(mount),))
    assert resolve_secret(f"file:{mount / 'password'}", policy) == SECRET
    assert resolve_secret(f"file:{mount / 'client-secret'}", policy) == "cs"
    assert resolve_secret(f"file:{mount / '..data' / 'password'}", policy) == SECRET


def test_a_secret_directory_that_is_itself_a_link(secret_dir: Path, tmp_path: Path) -> None:
    # /var/run -> /run on most systems: the directory is compared by its real path too.
    (tmp_path / "link").symlink_to(secret_dir)
    assert resolve_secret(f"file:{tmp_path / 'link' / 'pw'}", SecretPolicy((str(tmp_path / "link"),))) == SECRET


@pytest.mark.parametrize("reference", [
    "file:/etc/passwd",
    "file:{tmp}/outside",
    "file:{dir}/../outside",
    "file:{dir}/link-out",
    "file:{dir}/link-dir/outside",
])
def test_a_file_outside_the_directory_is_never_read(secret_dir: Path, tmp_path: Path, reference: str) -> None:
    (secret_dir / "link-out").symlink_to(tmp_path / "outside")
    (secret_dir / "link-dir").symlink_to(tmp_path)
    reference = reference.format(tmp=tmp_path, dir=secret_dir)
    policy = SecretPolicy((str(secret_dir),))
    with pytest.raises(SecretError) as caught:
        resolve_secret(reference, policy)
    message = str(caught.value)
    assert message in (outside(reference, str(secret_dir)), escaped(reference, str(secret_dir)))
    assert "link" not in reference or message == escaped(reference, str(secret_dir))
    assert OUTSIDE not in message and "root:" not in message


def test_env_references_need_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFOUS_SECRET_PW", SECRET)
    monkeypatch.setenv("HOOK_PW", OUTSIDE)
    policy = SecretPolicy()
    assert resolve_secret("env:SAFOUS_SECRET_PW", policy) == SECRET
    for name in ("HOOK_PW", "PATH", "HOME"):
        with pytest.raises(SecretError) as caught:
            resolve_secret(f"env:{name}", policy)
        assert str(caught.value) == not_prefixed(f"env:{name}")
        assert OUTSIDE not in str(caught.value)


# ------------------------------------------------------------------------ settings

def test_settings_read_the_directories_as_a_path_like_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFOUS_SECRET_DIR", "/etc/app-secrets:/run/vault")
    monkeypatch.setenv("SAFOUS_SECRET_ENV_PREFIX", "APP_")
    assert Settings().secret_policy == SecretPolicy(("/etc/app-secrets", "/run/vault"), "APP_")
    # A flag (a keyword here) wins over the variable.
    assert Settings(secret_dir=["/a", "/b"]).secret_policy.dirs == ("/a", "/b")
    monkeypatch.setenv("SAFOUS_SECRET_DIR", "")
    assert Settings().secret_policy.dirs == ()
    monkeypatch.delenv("SAFOUS_SECRET_DIR")
    monkeypatch.delenv("SAFOUS_SECRET_ENV_PREFIX")
    assert Settings().secret_policy == SecretPolicy((DEFAULT_DIR,), "SAFOUS_SECRET_")


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--secret-dir", "relative/dir"], {}, "--secret-dir: Value error, secret directory 'relative/dir' is not an "
                                           "absolute path"),
    ([], {"SAFOUS_SECRET_DIR": "/ok:rel"}, "--secret-dir: Value error, secret directory 'rel' is not an absolute path"),
    (["--secret-env-prefix", ""], {}, "--secret-env-prefix: Value error, secret environment prefix '' must be the "
                                      "start of a variable name (letters, digits and _, not first a digit), and "
                                      "not empty"),
])
def test_the_server_refuses_bad_secret_settings(tmp_path: Path, args: list[str], env: dict[str, str],
                                               message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--db", str(tmp_path / "rules.db"), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert (result.returncode, result.stderr) == (2, f"safous-sidecar: {message}\n")


# ------------------------------------------------------------------- the sidecar

def basic(name: str, url: str, password: str) -> Rule:
    return Rule(name=name, url=url, auth=AuthType.BASIC, username="svc", password=password)


REFUSED = [
    ("file:/etc/passwd", "outside"),
    ("file:{tmp}/outside", "outside"),
    ("file:{dir}/../outside", "outside"),
    ("file:{dir}/link-out", "escaped"),
    ("file:pw", "relative"),
    ("env:PATH", "env"),
    ("env:HOME", "env"),
    ("env:HOOK_PW", "env"),
]


@pytest.mark.parametrize(("reference", "why"), REFUSED)
async def test_the_sidecar_denies_with_rule_invalid(db, start_sidecar, authz, webhook: Webhook, secret_dir: Path,
                                                    tmp_path: Path, monkeypatch, reference: str, why: str) -> None:
    monkeypatch.setenv("HOOK_PW", OUTSIDE)
    monkeypatch.chdir(secret_dir)  # file:pw would be found from here, were relative paths allowed
    (secret_dir / "link-out").symlink_to(tmp_path / "outside")
    reference = reference.format(tmp=tmp_path, dir=secret_dir)
    webhook.routes["/x"] = answer({})
    seed(db, [basic("r", webhook.url + "/x", reference)], [Policy(name="app", rules=("r",))])
    sidecar = await start_sidecar(secret_dir=[str(secret_dir)])
    response = await authz(sidecar.port).Check(check_request("/"))
    assert code_of(response) == "rule_invalid"
    reason = denial_reason(response)
    assert reason is not None and reason.startswith(f'rule "r" is invalid: secret {reference}: ')
    expected = {"outside": "not under a secret directory", "escaped": "its real path (symbolic links resolved)",
                "relative": "the path is relative", "env": "only variables whose names start with SAFOUS_SECRET_"}
    assert expected[why] in reason
    assert OUTSIDE not in reason and "root:" not in reason
    assert webhook.requests == []  # the secret never left


@pytest.mark.parametrize("where", ["file", "kubelet", "env"])
async def test_the_sidecar_reads_secrets_in_their_places(db, start_sidecar, authz, webhook: Webhook,
                                                        secret_dir: Path, monkeypatch, where: str) -> None:
    monkeypatch.setenv("SAFOUS_SECRET_HOOK_PW", SECRET)
    kubelet_volume(secret_dir / "volume", {"password": SECRET + "\n"})
    reference = {"file": f"file:{secret_dir / 'pw'}", "kubelet": f"file:{secret_dir / 'volume' / 'password'}",
                 "env": "env:SAFOUS_SECRET_HOOK_PW"}[where]
    webhook.routes["/x"] = answer({})
    seed(db, [basic("r", webhook.url + "/x", reference)], [Policy(name="app", rules=("r",))])
    sidecar = await start_sidecar(secret_dir=[str(secret_dir)])
    response = await authz(sidecar.port).Check(check_request("/"))
    assert code_of(response) == "allowed", denial_reason(response)
    assert webhook.requests[0]["headers"]["authorization"] == "Basic " + base64.b64encode(
        f"svc:{SECRET}".encode()).decode()


async def test_the_default_policy_applies_without_settings(db, start_sidecar, authz, webhook: Webhook,
                                                           secret_dir: Path) -> None:
    # A file under tmp_path is outside /var/run/secrets/safous: the test configures nothing.
    seed(db, [basic("r", webhook.url + "/x", f"file:{secret_dir / 'pw'}")], [Policy(name="app", rules=("r",))])
    sidecar = await start_sidecar()
    response = await authz(sidecar.port).Check(check_request("/"))
    assert code_of(response) == "rule_invalid"
    assert denial_reason(response) == 'rule "r" is invalid: ' + outside(f"file:{secret_dir / 'pw'}")


async def test_the_real_program_takes_repeated_secret_dir_flags(tmp_path: Path, webhook: Webhook) -> None:
    dirs = {name: tmp_path / name for name in ("a", "b", "c")}
    for name, path in dirs.items():
        path.mkdir()
        (path / "pw").write_text(f"pw-{name}\n")
    webhook.routes["/x"] = answer({})
    db = tmp_path / "rules.db"
    seed(db, [basic(name, webhook.url + "/x", f"file:{path / 'pw'}") for name, path in dirs.items()],
         [Policy(name=name, hosts=(f"{name}.example.com",), rules=(name,)) for name in dirs])
    # Flags replace the variable's list: c is configured only there.
    log, port = await asyncio.to_thread(
        start_server, db, "--secret-dir", str(dirs["a"]), "--secret-dir", str(dirs["b"]),
        env={"SAFOUS_SECRET_DIR": str(dirs["c"])})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            codes = {name: code_of(await stub.Check(check_request("/", host=f"{name}.example.com")))
                     for name in dirs}
        assert codes == {"a": "allowed", "b": "allowed", "c": "rule_invalid"}
        assert sorted(r["headers"]["authorization"] for r in webhook.requests) == [
            "Basic " + base64.b64encode(f"svc:pw-{name}".encode()).decode() for name in ("a", "b")]
        log.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(log.proc.wait, 15) == 0
    finally:
        await asyncio.to_thread(log.close)


# --------------------------------------------------------------- the admin script

ADD = ["rule", "add", "r", "--url", "http://x/", "--auth", "basic", "--username", "u", "--password"]


@pytest.mark.parametrize(("password", "message"), [
    ("file:/etc/passwd", outside("file:/etc/passwd")),
    (f"file:{DEFAULT_DIR}/../../../etc/passwd", outside(f"file:{DEFAULT_DIR}/../../../etc/passwd")),
    ("file:passwd", f"secret file:passwd: the path is relative: use an absolute path under a secret directory "
                    f"(--secret-dir {DEFAULT_DIR})"),
    ("env:PATH", not_prefixed("env:PATH")),
    ("env:HOME", not_prefixed("env:HOME")),
])
def test_the_admin_refuses_references_outside_the_policy(db: Path, password: str, message: str) -> None:
    refused(admin(db, *ADD, password), f'rule "r": --password: {message}')
    ok_rule = admin(db, *ADD, f"file:{DEFAULT_DIR}/pw")
    assert ok_rule.exit_code == 0, ok_rule.output
    refused(admin(db, "rule", "edit", "r", "--password", password), f'rule "r": --password: {message}')
    refused(admin(db, "rule", "edit", "r", "--auth", "oauth", "--token-url", "https://idp/t", "--client-id", "c",
                  "--client-secret", password), f'rule "r": --client-secret: {message}')
    assert stored_rules(db)["r"].password == f"file:{DEFAULT_DIR}/pw"
    assert count(db, "rules") == 1


def test_the_admin_reads_the_sidecars_settings(db: Path, tmp_path: Path) -> None:
    ref = f"file:{tmp_path / 'vault' / 'pw'}"
    refused(admin(db, *ADD, ref), f'rule "r": --password: {outside(ref)}')
    # The same variable as the sidecar, the same list syntax.
    added = admin(db, *ADD, ref, env={"SAFOUS_SECRET_DIR": f"/etc/other:{tmp_path / 'vault'}"})
    assert (added.exit_code, added.stdout) == (0, 'rule "r" created\n'), added.output
    # Or the global option, repeated; it replaces the variable, as the sidecar's flag does.
    edited = admin(db, "--secret-dir", "/etc/other", "--secret-dir", str(tmp_path / "vault"),
                   "rule", "edit", "r", "--password", ref + "2", env={"SAFOUS_SECRET_DIR": "/nowhere"})
    assert edited.exit_code == 0, edited.output
    refused(admin(db, "--secret-dir", "/etc/other", "rule", "edit", "r", "--password", ref,
                  env={"SAFOUS_SECRET_DIR": str(tmp_path / "vault")}),
            f'rule "r": --password: {outside(ref, "/etc/other")}')
    # The prefix likewise.
    refused(admin(db, "rule", "edit", "r", "--password", "env:APP_PW"),
            f'rule "r": --password: {not_prefixed("env:APP_PW")}')
    assert admin(db, "rule", "edit", "r", "--password", "env:APP_PW",
                 env={"SAFOUS_SECRET_ENV_PREFIX": "APP_"}).exit_code == 0
    assert admin(db, "--secret-env-prefix", "VAULT_", "rule", "edit", "r", "--password", "env:VAULT_PW",
                 env={"SAFOUS_SECRET_ENV_PREFIX": "APP_"}).exit_code == 0
    assert stored_rules(db)["r"].password == "env:VAULT_PW"


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--secret-dir", "relative"], {}, "Invalid value for --secret-dir: secret directory 'relative' is not an "
                                       "absolute path"),
    ([], {"SAFOUS_SECRET_DIR": "relative"}, "Invalid value for SAFOUS_SECRET_DIR: secret directory 'relative' is "
                                            "not an absolute path"),
    (["--secret-env-prefix", "A-"], {}, "Invalid value for --secret-env-prefix: secret environment prefix 'A-' must "
                                        "be the start of a variable name (letters, digits and _, not first a digit), "
                                        "and not empty"),
    ([], {"SAFOUS_SECRET_ENV_PREFIX": ""}, "Invalid value for SAFOUS_SECRET_ENV_PREFIX: secret environment prefix "
                                           "'' must be the start of a variable name (letters, digits and _, not "
                                           "first a digit), and not empty"),
])
def test_the_admin_refuses_bad_secret_settings(db: Path, args: list[str], env: dict[str, str], message: str) -> None:
    refused(admin(db, *args, "rule", "list", env=env), message, exit_code=2)


def test_the_admin_shows_stored_references_the_sidecar_refuses(db: Path) -> None:
    # Written with plain SQL (or before the policy): the admin says what the sidecar will do.
    seed(db, [basic("r", "http://x/", "file:/etc/passwd")])
    shown = admin(db, "rule", "show", "r")
    assert shown.exit_code == 0 and f"password: {outside('file:/etc/passwd')}" in shown.stdout, shown.output
    listed = json.loads(admin(db, "rule", "list", "--json").stdout)
    assert listed["problem"] == f"password: {outside('file:/etc/passwd')}"
    admin(db, "rule", "disable", "r")
    enabled = admin(db, "rule", "enable", "r")
    assert enabled.stderr == (f'warning: rule "r" does not validate (password: {outside("file:/etc/passwd")}): '
                              "the policies that use it deny with rule_invalid until it is repaired\n")


def test_the_admin_import_refuses_references_outside_the_policy(db: Path, tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    rule = {"name": "r", "url": "http://x/", "auth": "basic", "username": "u", "password": "env:HOME"}
    path.write_text(json.dumps({"rules": [rule], "policies": []}))
    refused(admin(db, "import", str(path)), f'{path}: rule "r": password: {not_prefixed("env:HOME")}')
    assert count(db, "rules") == 0
    path.write_text(json.dumps({"rules": [{**rule, "password": "env:SAFOUS_SECRET_PW"}], "policies": []}))
    assert admin(db, "import", str(path)).exit_code == 0
    assert stored_rules(db)["r"].password == "env:SAFOUS_SECRET_PW"


async def test_the_admin_dry_run_resolves_as_the_sidecar(db: Path, secret_dir: Path, tmp_path: Path,
                                                         webhook: Webhook) -> None:
    # A link inside the directory is fine as written; only where the sidecar runs does it
    # turn out to lead outside, and the dry run, which reads the file, refuses it like the sidecar.
    (secret_dir / "link-out").symlink_to(tmp_path / "outside")
    secrets = {"SAFOUS_SECRET_DIR": str(secret_dir)}
    ref = f"file:{secret_dir / 'link-out'}"
    webhook.routes["/x"] = answer({})
    assert admin(db, *ADD[:4], webhook.url + "/x", *ADD[5:], ref, env=secrets).exit_code == 0
    result = await asyncio.to_thread(admin, db, "test", "r", env=secrets)
    refused(result, f'rule "r" cannot run: {escaped(ref, str(secret_dir))}', exit_code=2)
    assert webhook.requests == []
    assert admin(db, "rule", "edit", "r", "--password", f"file:{secret_dir / 'pw'}", env=secrets).exit_code == 0
    result = await asyncio.to_thread(admin, db, "test", "r", env=secrets)
    assert result.exit_code == 0, result.output
    assert webhook.requests[0]["headers"]["authorization"] == "Basic " + base64.b64encode(
        f"u:{SECRET}".encode()).decode()
