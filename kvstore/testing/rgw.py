"""A single-node Ceph RADOS Gateway on 127.0.0.1: a production S3 server for tests and benchmarks.

One monitor, one OSD and radosgw (no manager), every daemon bound to 127.0.0.1
on free ports, data in a temporary directory (``memstore``: in RAM) that is
removed on stop. The daemons run in the foreground as children of this process
(stopped by their own pids, and killed by the kernel if this process dies), and
every admin command runs under a timeout: ``ceph`` commands that need a manager
hang forever otherwise. Needs Debian's ``radosgw``, ``ceph-mon`` and ``ceph-osd``
packages (Ceph 16 and later)::

    with RadosGateway() as rgw:              # ~2-4 s
        rgw.endpoint, rgw.https_endpoint, rgw.ca_file, rgw.access_key, rgw.secret_key

    python -m kvstore.testing.rgw            # start one, print its settings, stop on Ctrl-C
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

__all__ = ["REQUIRED_PROGRAMS", "RadosGateway", "RGWError", "missing_programs"]

REQUIRED_PROGRAMS = ("monmaptool", "ceph-mon", "ceph-osd", "ceph", "radosgw", "radosgw-admin")
"""What must be on PATH: Debian/Ubuntu ``apt-get install radosgw ceph-mon ceph-osd``."""

ADMIN_TIMEOUT = 60.0
"""Seconds any one admin command may take."""
START_TIMEOUT = 60.0
"""Seconds a daemon may take to become ready."""


class RGWError(RuntimeError):
    """The gateway could not be started; the message ends with the tail of the failing daemon's log."""


def missing_programs() -> list[str]:
    """The Ceph programs that are not on PATH (empty when a gateway can start)."""
    return [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent exits, so no daemon outlives a killed test run."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _config(fsid: str, root: Path, mon_port: int, http_port: int, https_port: int | None) -> str:
    """ceph.conf for one node: loopback only, no authentication between daemons, one replica, small pools."""
    frontend = f"beast endpoint=127.0.0.1:{http_port}"
    if https_port is not None:
        frontend += f" ssl_endpoint=127.0.0.1:{https_port} ssl_certificate={root}/tls/cert.pem"
        frontend += f" ssl_private_key={root}/tls/key.pem"
    return f"""[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
run dir = {root}/run
admin socket = {root}/run/$name.asok
log file = {root}/log/$name.log
pid file = {root}/run/$name.pid
keyring = {root}/keyring
mon data = {root}/mon/$name
osd data = {root}/osd/$name
osd objectstore = memstore
memstore device bytes = 8589934592
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# Placement at start-up raced the OSD's learning of the fsid ("wrong fsid", exit); place it by hand.
osd crush update on start = false
osd class update on start = false
paxos propose interval = 0.1
[client.rgw.a]
rgw frontends = {frontend}
rgw data = {root}/rgw
rgw enable usage log = false
"""


def _write_self_signed(directory: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (and localhost); the certificate file is its own CA bundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file = directory / "cert.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_file


class RadosGateway:
    """A throw-away single-node Ceph cluster with an S3 gateway; ``start()``/``stop()`` or ``with``.

    ``access_key``/``secret_key`` are the S3 user created at start; ``https``
    adds a TLS endpoint with a self-signed certificate (``ca_file`` verifies it).
    """

    def __init__(
        self,
        *,
        access_key: str = "testing",
        secret_key: str = "testing",
        https: bool = True,
        parent_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.https = https
        self._parent_dir = parent_dir
        self.root: Path | None = None
        self.http_port = 0
        self.https_port: int | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ what clients need

    @property
    def endpoint(self) -> str:
        """The plain-HTTP S3 endpoint."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_endpoint(self) -> str | None:
        """The HTTPS S3 endpoint (self-signed; verify with ``ca_file``), or None without ``https``."""
        return None if self.https_port is None else f"https://127.0.0.1:{self.https_port}"

    @property
    def ca_file(self) -> str | None:
        return None if self.root is None or self.https_port is None else str(self.root / "tls" / "cert.pem")

    @property
    def pids(self) -> dict[str, int]:
        """The pid of each running daemon (mon, osd, rgw)."""
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> RadosGateway:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> RadosGateway:
        """Start mon, osd and radosgw and create the S3 user; retried on fresh ports if a port was taken."""
        missing = missing_programs()
        if missing:
            raise RGWError(f"Ceph programs not found: {', '.join(missing)} (apt-get install radosgw ceph-mon ceph-osd)")
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except RGWError:
                self.stop()
                if attempt + 1 == attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the daemons in reverse order of start (SIGTERM, SIGKILL after 2 s) and delete the data.

        radosgw takes about 5 s to drain on SIGTERM; the data is thrown away, so it need not.
        """
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _start_once(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="kvstore-rgw-", dir=self._parent_dir))
        self.root = root
        for sub in ("run", "log", "mon/mon.a", "osd/osd.0", "rgw"):
            (root / sub).mkdir(parents=True)
        if self.https:
            _write_self_signed(root / "tls")
        fsid = str(uuid.uuid4())
        mon_port = _free_port()
        self.http_port = _free_port()
        self.https_port = _free_port() if self.https else None
        (root / "ceph.conf").write_text(_config(fsid, root, mon_port, self.http_port, self.https_port))

        self._admin(
            "monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v1:127.0.0.1:{mon_port}]", str(root / "monmap")
        )
        self._admin("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(root / "monmap"))
        self._spawn("mon", "ceph-mon", "-f", "-i", "a")
        self._wait_for(lambda: self._admin_ok("ceph", "mon", "stat"), "mon", "the monitor answers")

        osd_uuid = str(uuid.uuid4())
        osd_id = self._admin("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RGWError(f"`ceph osd new` gave OSD id {osd_id!r}, expected 0")
        self._admin("ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid)
        self._admin("ceph", "osd", "crush", "add", "osd.0", "1.0", "root=default")
        self._spawn("osd", "ceph-osd", "-f", "-i", "0")
        self._wait_for(lambda: "1 up" in self._admin("ceph", "osd", "stat"), "osd", "the OSD is up")

        self._spawn("rgw", "radosgw", "-f", "-n", "client.rgw.a")
        self._wait_for(self._http_answers, "rgw", "the gateway answers HTTP")
        self.create_user("kvstore", self.access_key, self.secret_key)

    def create_user(self, uid: str, access_key: str, secret_key: str) -> None:
        """Another S3 user (``arn:aws:iam:::user/<uid>`` in bucket policies) with these keys."""
        self._admin(
            "radosgw-admin", "-n", "client.rgw.a", "user", "create", "--uid", uid, "--display-name", uid,
            "--access-key", access_key, "--secret", secret_key,
        )  # fmt: skip

    # ------------------------------------------------------------------ helpers

    def _conf(self) -> list[str]:
        assert self.root is not None
        return ["-c", str(self.root / "ceph.conf")]

    def _command(self, program: str, args: tuple[str, ...]) -> list[str]:
        if program in ("monmaptool",):
            return [program, *args]
        extra = ["--connect-timeout", "10"] if program == "ceph" else []
        return [program, *self._conf(), *extra, *args]

    def _admin(self, program: str, *args: str, timeout: float = ADMIN_TIMEOUT) -> str:
        """Run an admin command to completion under ``timeout``; its stdout, or RGWError with its output."""
        cmd = self._command(program, args)
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, preexec_fn=_die_with_parent)
        except subprocess.TimeoutExpired as exc:
            raise RGWError(f"`{' '.join(cmd)}` did not finish within {timeout} s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace").strip()[-2000:]
            raise RGWError(f"`{' '.join(cmd)}` exited {done.returncode}: {output}")
        return done.stdout.decode(errors="replace")

    def _admin_ok(self, program: str, *args: str) -> bool:
        try:
            self._admin(program, *args, timeout=15)
        except RGWError:
            return False
        return True

    def _spawn(self, name: str, program: str, *args: str) -> None:
        assert self.root is not None
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            self._procs[name] = subprocess.Popen(
                self._command(program, args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _wait_for(self, ready: object, name: str, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise RGWError(f"{name} exited with {proc.returncode} before {what}: {self._log_tail(name)}")
            with contextlib.suppress(RGWError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise RGWError(f"{name}: {what} not within {START_TIMEOUT} s: {self._log_tail(name)}")
            time.sleep(0.1)

    def _http_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer (403 for an anonymous request) means it serves
        except OSError:
            return False

    def _log_tail(self, name: str) -> str:
        assert self.root is not None
        texts = []
        for path in (self.root / "log" / f"{name}.out", *sorted((self.root / "log").glob(f"*{name}*.log"))):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace")[-1500:])
        return "\n".join(texts) or "(no log)"


def main() -> None:
    """Start a gateway, print how to reach it, and stop it on Ctrl-C or SIGTERM."""
    with RadosGateway() as rgw:
        print(f"AWS_ENDPOINT_URL={rgw.endpoint}")
        print(f"AWS_ACCESS_KEY_ID={rgw.access_key}")
        print(f"AWS_SECRET_ACCESS_KEY={rgw.secret_key}")
        print(f"# HTTPS: {rgw.https_endpoint} (CA bundle {rgw.ca_file}); daemons {rgw.pids}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
