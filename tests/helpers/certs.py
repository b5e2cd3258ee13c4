"""TLS certificates for the broker from a throwaway test CA (trustme)."""

from __future__ import annotations

from pathlib import Path

import attrs
import trustme


@attrs.frozen
class Certs:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    #: Key and chain in one file (tls_key omitted).
    bundle_file: Path


def make_certs(directory: Path, name: str = "certs") -> Certs:
    directory = directory / name
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    bundle_file = directory / "bundle.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key_file))
    issued.private_key_and_cert_chain_pem.write_to_path(str(bundle_file))
    return Certs(ca, ca_file, cert_file, key_file, bundle_file)
