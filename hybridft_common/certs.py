"""``hybridft certs init|issue``: a pair's CA and each host's credentials directory.

Why our own small CA: every ``tcp:`` channel of a pair is mutual TLS (:mod:`hybridft_common.tls`), and
both ends must trust exactly the pair's CA -- not the system's, which would let any certificate a public
CA ever signed talk to the disk server.  ``init`` makes the CA (``ca-cert.pem``, ``ca-key.pem``; keep the
key off the hosts); ``issue`` makes one host's directory in the layout QEMU's ``tls-creds-x509`` reads
(``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``), which
is copied to that host and named as its ``tls-creds``.

The certificates satisfy QEMU's own checks (``crypto/tlscredsx509.c``): the CA has basicConstraints
CA:TRUE and keyCertSign; host certificates CA:FALSE, digitalSignature + keyEncipherment, and the
extended key usage of their role (serverAuth, clientAuth).  The server certificate names the host
(DNS) and every ``--ip`` address, because clients -- QEMU's NBD, chardev and migration clients too --
check the name they dialled.  Every file is written 0600 without following symlinks.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import click

from hybridft_common.secure import ensure_private_dir, open_nofollow
from hybridft_common.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

CA_KEY = "ca-key.pem"
DEFAULT_DAYS = 3650
KEY_BITS = 2048  # RSA: what QEMU's documentation and every GnuTLS build accept


class CertsError(click.ClickException):
    """A CA or host directory that cannot be made (the message says why)."""


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = open_nofollow(path, flags, 0o600)
    except FileExistsError:
        raise CertsError(f"{path} already exists (use --force to replace it)") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(data)


def _new_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _pem_key(key) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(subject: str, issuer, public_key, days: int):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


@dataclass(frozen=True, slots=True)
class IssuedHost:
    dir: Path
    host: str
    ips: tuple[str, ...]


def init_ca(
    ca_dir: Path, *, name: str = "hybridft pair CA", days: int = DEFAULT_DAYS, force: bool = False
) -> Path:
    """Create the pair's CA in ``ca_dir`` (0700): ``ca-cert.pem`` and ``ca-key.pem`` (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ensure_private_dir(ca_dir, what="CA directory")
    key = _new_key()
    issuer = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, issuer, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca_dir / CA_KEY, _pem_key(key), overwrite=force)
    _write_private(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), overwrite=force)
    return ca_dir


def issue_host(
    ca_dir: Path,
    host: str,
    ips: tuple[str, ...] = (),
    *,
    out: Path | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> IssuedHost:
    """Write ``host``'s credentials directory (default ``ca_dir/host``) signed by the CA in ``ca_dir``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CertsError(
            f"no CA in {ca_dir} ({exc.filename} missing): run `hybridft certs init {ca_dir}`"
        ) from None
    except ValueError as exc:
        raise CertsError(f"the CA in {ca_dir} is unreadable: {exc}") from None
    try:
        addresses = tuple(ipaddress.ip_address(ip) for ip in ips)
    except ValueError as exc:
        raise CertsError(str(exc)) from None
    target = ensure_private_dir(out or ca_dir / host, what="credentials directory")
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    names += [x509.IPAddress(address) for address in addresses]
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())  # type: ignore[arg-type]
    for role, cert_name, key_name, purpose in (
        ("server", SERVER_CERT, SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", CLIENT_CERT, CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = _new_key()
        cert = (
            _builder(f"{host} ({role})", ca_cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        _write_private(target / key_name, _pem_key(key), overwrite=force)
        _write_private(target / cert_name, cert.public_bytes(serialization.Encoding.PEM), overwrite=force)
    _write_private(target / CA_CERT, (ca_dir / CA_CERT).read_bytes(), overwrite=force)
    return IssuedHost(target, host, tuple(str(a) for a in addresses))


@click.group("certs")
def certs() -> None:
    """TLS credentials for a pair's tcp: channels (a CA, then one directory per host)."""


@certs.command("init")
@click.argument("ca_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", type=click.IntRange(min=1), default=DEFAULT_DAYS, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (every host must then be reissued).")
def init_command(ca_dir: Path, days: int, force: bool) -> None:
    """Create the pair's CA in CA_DIR (ca-cert.pem, ca-key.pem; keep ca-key.pem off the hosts)."""
    init_ca(ca_dir, days=days, force=force)
    click.echo(f"CA created in {ca_dir}; next: hybridft certs issue {ca_dir} --host NAME --ip ADDRESS")


@certs.command("issue")
@click.argument("ca_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", required=True, help="The host's DNS name (also the default directory name).")
@click.option("--ip", "ips", multiple=True, help="An IP address clients dial this host at (repeatable).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), help="Directory (default CA_DIR/HOST)."
)
@click.option("--days", type=click.IntRange(min=1), default=DEFAULT_DAYS, show_default=True)
@click.option("--force", is_flag=True, help="Replace existing files.")
def issue_command(
    ca_dir: Path, host: str, ips: tuple[str, ...], out: Path | None, days: int, force: bool
) -> None:
    """Issue HOST's credentials directory (QEMU tls-creds-x509 layout) from the CA in CA_DIR."""
    issued = issue_host(ca_dir, host, ips, out=out, days=days, force=force)
    click.echo(f"{issued.dir}: credentials for {host}; use it as tls-creds (e.g. --tls-creds {issued.dir})")
