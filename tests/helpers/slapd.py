"""A private OpenLDAP server (Debian's slapd) for tests: loopback only, free ports, a directory the test writes.

:class:`Slapd` writes a ``slapd.conf`` (the old single-file format, read with
``-f``: simpler to generate than a cn=config tree) into a directory the test
owns, loads the test's entries offline with ``slapadd``, and runs slapd in
the foreground (``-d 0``) on ``ldap://127.0.0.1:PORT`` and, when TLS is
asked for, ``ldaps://127.0.0.1:PORT2`` with a certificate signed by a
throwaway CA (:func:`make_tls_files`, ``cryptography``). The ldap:// port then
offers StartTLS with the same certificate. Nothing under /etc/ldap is read
except the schema files, and no system service is involved.

The server is waited for by connecting to its port (bounded) and stopped by
its PID. This module does not import pytest: a missing package raises
:class:`SlapdUnavailable`, which the fixture turns into a skip.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.server import free_port, stop_process

NOT_INSTALLED = "OpenLDAP slapd not installed (Debian packages slapd and ldap-utils; .ci/run installs them)"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
START_TIMEOUT = 30.0

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
READER_DN = f"cn=reader,{SUFFIX}"


class SlapdUnavailable(RuntimeError):
    """slapd, slapadd or the schema files are missing: skip, do not fail."""


class SlapdError(RuntimeError):
    """slapd is installed but would not load the directory or start: a real failure, with its output."""


def find_binaries() -> tuple[str, str]:
    path = "/usr/sbin:/usr/bin:/sbin"
    slapd, slapadd = shutil.which("slapd", path=path), shutil.which("slapadd", path=path)
    if slapd is None or slapadd is None or not (SCHEMA_DIR / "inetorgperson.schema").exists():
        raise SlapdUnavailable(NOT_INSTALLED)
    return slapd, slapadd


def ssha(password: str) -> str:
    """An RFC 2307 ``{SSHA}`` userPassword value (slapd verifies it on a simple bind)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # what a client trusts
    cert: Path  # the server's certificate, for 127.0.0.1 and localhost
    key: Path


def make_tls_files(directory: Path, name: str = "test") -> TlsFiles:
    """A fresh CA and a server certificate it signs (EC P-256, one day), written as PEM into *directory*."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey | None, ca: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        name_ = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name_)
            .issuer_name(issuer or name_)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return key, builder.sign(signer or key, hashes.SHA256())

    ca_key, ca_cert = build(f"{name} CA", None, None, True)
    key, cert = build("127.0.0.1", ca_cert.subject, ca_key, False)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / f"{name}-ca.pem", directory / f"{name}-cert.pem", directory / f"{name}-key.pem")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key.chmod(0o600)
    return files


class Slapd:
    """One slapd with the suffix dc=example,dc=org, a root DN, a read-only service account and *ldif* entries."""

    def __init__(self, root: Path, ldif: str, *, tls: TlsFiles | None = None, reader_password: str = "reader-pw"):
        self.slapd, self.slapadd = find_binaries()
        self.root = root
        self.ldif = ldif
        self.tls = tls
        self.reader_password = reader_password
        self.port = free_port()
        self.ldaps_port = free_port() if tls else 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "slapd.log"

    def start(self) -> Slapd:
        if self.process is None and not (self.root / "db" / "data.mdb").exists():
            self._write_config()
            self._load()
        urls = self.url + (f" {self.ldaps_url}" if self.tls else "")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.slapd, "-d", "0", "-h", urls, "-f", str(self.root / "slapd.conf")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._listening(self.port) and (not self.tls or self._listening(self.ldaps_port)):
                return self
            time.sleep(0.05)
        self.stop()
        raise SlapdError(f"slapd did not start:\n{self._log()}")

    def stop(self) -> None:
        """Stop slapd by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def _write_config(self) -> None:
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        schemas = "".join(f"include {SCHEMA_DIR / s}.schema\n" for s in ("core", "cosine", "inetorgperson", "nis"))
        tls = ""
        if self.tls:
            tls = (
                f"TLSCACertificateFile {self.tls.ca_cert}\n"
                f"TLSCertificateFile {self.tls.cert}\n"
                f"TLSCertificateKeyFile {self.tls.key}\n"
            )
        (self.root / "slapd.conf").write_text(
            SLAPD_CONF.format(schemas=schemas, root=self.root, modules=MODULE_DIR, tls=tls, suffix=SUFFIX,
                              rootdn=ROOT_DN, reader=READER_DN)
        )

    def _load(self) -> None:
        base = BASE_LDIF.format(suffix=SUFFIX, reader=READER_DN, reader_password=ssha(self.reader_password))
        (self.root / "data.ldif").write_text(base + "\n" + self.ldif.strip() + "\n")
        result = subprocess.run(
            [self.slapadd, "-f", str(self.root / "slapd.conf"), "-l", str(self.root / "data.ldif")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise SlapdError(f"slapadd failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-2000:]}")


# Passwords: a user may only authenticate with its own (anonymous 'auth'); the reader and users read the rest.
# 'allow bind_anon_dn' makes slapd treat a DN with an empty password as an anonymous bind that succeeds, as
# some directories do by default: the realm must refuse such a login itself, and the tests show it does.
SLAPD_CONF = """{schemas}
allow bind_anon_dn
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath {modules}
moduleload back_mdb
{tls}
database mdb
maxsize 16777216
suffix "{suffix}"
rootdn "{rootdn}"
directory {root}/db
access to attrs=userPassword
    by anonymous auth
    by self write
    by * none
access to *
    by * read
"""

BASE_LDIF = """dn: {suffix}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,{suffix}
objectClass: organizationalUnit
ou: people

dn: {reader}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: reader
userPassword: {reader_password}
"""


def person(uid: str, password: str, *, rdn_value: str | None = None, ou: str = "people") -> str:
    """The LDIF of an inetOrgPerson under ou=OU; *rdn_value* is the RDN as written in the DN (escaped by the test)."""
    return (
        f"dn: uid={rdn_value or uid},ou={ou},{SUFFIX}\n"
        "objectClass: inetOrgPerson\n"
        f"uid: {uid}\n"
        f"cn: {uid}\n"
        f"sn: {uid}\n"
        f"userPassword: {ssha(password)}\n"
    )
