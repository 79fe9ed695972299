"""``safous-admin bundle``: publish this rules.db's rule set as a signed bundle for a fleet of
sidecars (``safous-sidecar serve --bundle``), and read which bundle a sidecar's rules.db holds.

The format, signing and verification are ``sidecar.bundles``'; here, the commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sidecar import bundles, db
from sidecar.bundles import ALGORITHMS, MAX_SEQUENCE

from .validation import AdminError

if TYPE_CHECKING:
    from .access import Admin

__all__ = ["bundle"]


@click.group("bundle")
def bundle() -> None:
    """Publish the rule set to every sidecar as a signed bundle.

    The admins' rules.db stays where rules are written, tried and audited; `bundle build`
    signs its rules and policies into one file; sidecars started with --bundle FILE-OR-URL and
    --bundle-verification-key follow it: each new revision is verified and applied within
    their poll interval, and a bad or older one changes nothing.

    \b
    Example:
      safous-admin bundle keygen signing                # signing.key, signing.pub
      safous-admin bundle build bundle.jws --signing-key signing.key
      kubectl create configmap safous-bundle --from-file=bundle.jws \\
          --dry-run=client -o yaml | kubectl apply -f -
    """


@bundle.command("keygen")
@click.argument("prefix", type=click.Path(dir_okay=False))
@click.option("--algorithm", type=click.Choice(sorted(ALGORITHMS)), default="ed25519", show_default=True,
              help="ed25519 signs with EdDSA, es256 with ECDSA on P-256.")
def keygen(prefix: str, algorithm: str) -> None:
    """Write a key pair for signing bundles.

    PREFIX.key is the private key (created readable by you only: keep it in the CI's secret
    store); PREFIX.pub is the public key, which every sidecar gets as
    --bundle-verification-key. Prints the key id (the key's RFC 7638 thumbprint), which the
    bundles it signs name. Existing files are not overwritten.
    """
    # Both names first: a .key written before finding .pub taken would be left without its pair.
    for path in (prefix + ".key", prefix + ".pub"):
        if os.path.lexists(path):
            raise AdminError(f"{path} exists: choose another PREFIX (a key is never overwritten)", 2)
    private, public, key_id = bundles.generate_key(algorithm)
    written: list[str] = []
    for suffix, data, mode in ((".key", private, 0o600), (".pub", public, 0o644)):
        path = prefix + suffix
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as exc:
            # Created meanwhile, or not writable: no half pair stays behind.
            for orphan in written:
                os.unlink(orphan)
            if isinstance(exc, FileExistsError):
                raise AdminError(f"{path} exists: choose another PREFIX (a key is never overwritten)", 2) from None
            raise AdminError(f"cannot write {path}: {exc.strerror}") from None
        with open(fd, "wb") as out:
            out.write(data)
        written.append(path)
    click.echo(f"wrote {prefix}.key (private) and {prefix}.pub (public); key id {key_id} ({ALGORITHMS[algorithm]})")


def _signing_key_pem(spec: str) -> tuple[bytes, str]:
    """The PEM that ``--signing-key`` names, and how to name it in messages."""
    if "-----BEGIN" in spec:
        raise AdminError("--signing-key: a private key written on the command line ends up in shell history and "
                         "process lists: give its file (--signing-key PATH) or a variable holding it "
                         "(--signing-key env:NAME)", 2)
    if spec.startswith("env:"):
        value = os.environ.get(spec[4:])
        if value is None:
            raise AdminError(f"--signing-key {spec}: the variable is not set", 2)
        return value.encode(), spec
    path = spec.removeprefix("file:")
    try:
        return Path(path).read_bytes(), path
    except OSError as exc:
        raise AdminError(f"--signing-key: cannot read {path}: {exc.strerror}", 2) from None


def _write_atomically(out: str, text: str) -> None:
    """Write ``out`` whole or not at all: a sidecar reading the file never sees half of it."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(out))
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".bundle-")
        with open(fd, "w", encoding="ascii") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except OSError as exc:
        raise AdminError(f"cannot write {out}: {exc.strerror}") from None


@bundle.command("build")
@click.argument("out", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--signing-key", required=True, metavar="KEY",
              help="The PEM private key: PATH, file:PATH, or env:NAME (a variable holding it).")
@click.option("--key-id", metavar="ID", help="The key id to name.  [default: the key's thumbprint]")
@click.option("--sequence", type=click.IntRange(min=0, max=MAX_SEQUENCE), metavar="N",
              help="The revision's sequence; sidecars only apply a greater one.  [default: now, in ms]")
@click.pass_obj
def build(admin: Admin, out: str, signing_key: str, key_id: str | None, sequence: int | None) -> None:
    """Sign every rule and policy into a bundle.

    Writes OUT (- for standard output): the export of rules.db (see `export`), a revision
    (sequence, then the content's hash) and an EdDSA or ES256 signature (JWS). Sidecars apply
    a bundle only if its sequence is greater than the one they hold: to roll back, build a new
    bundle from the older content.

    A bundle never carries a secret in clear (bundles end up in Git, ConfigMaps and object
    stores): a rule with a literal password, client secret or Authorization header is refused;
    store it as env:NAME or file:PATH and give each sidecar the secret. Everything is
    validated as `import` would, before anything is written.
    """
    from sidecar.exchange import InvalidContent, export_document, plan_import

    from . import display

    with admin.read() as conn:
        rules = db.read_rules(conn)
        policies = db.read_policies(conn)
    document = export_document(rules, policies, with_secrets=True)
    try:
        plan_import(document, [], [], replace=True, secrets=admin.secrets)
    except InvalidContent as exc:
        raise InvalidContent(f"the rule set does not validate, no bundle written: {exc}") from None
    pem, where = _signing_key_pem(signing_key)
    try:
        key = bundles.load_signing_key(pem, where)
    except ValueError as exc:
        raise AdminError(f"--signing-key: {exc}", 2) from None
    try:
        token, built = bundles.build_bundle(document, key, key_id=key_id, sequence=sequence)
    except bundles.BundleRefused as exc:
        raise AdminError(str(exc)) from None
    if out == "-":
        click.echo(token)
        return
    _write_atomically(out, token + "\n")
    click.echo(f"bundle {out}: revision {built.revision}, {display.counted(len(rules), 'rule')} and "
               f"{display.counted(len(policies), 'policy')}, signed with key {built.key_id}")


@bundle.command("status")
@click.pass_obj
def status(admin: Admin) -> None:
    """Show which bundle revision rules.db holds.

    On a sidecar's rules.db: the revision applied, when (UTC), from where and the key that
    signed it. Exit status 1 if no bundle was ever applied.
    """
    with admin.read() as conn:
        state = db.read_bundle_state(conn)
    if state is None:
        click.echo(f"rules.db {admin.db}: no bundle applied")
        click.get_current_context().exit(1)
    key = state.key_id or "none: applied with --bundle-insecure-skip-verify"
    click.echo(f"revision  {state.revision}\napplied   {state.applied_at}\nsource    {state.source}\n"
               f"key id    {key}")
