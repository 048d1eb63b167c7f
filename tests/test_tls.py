"""TLS and mutual TLS on the service port, client identities in policies and the audit log,
and the grpc:// backend over TLS. Certificates are made by the test with the openssl command."""

import asyncio
import shutil
import subprocess

import grpc
import pytest
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.backends.spec import build_backend
from pacsys.supervised import AuditLog, SupervisedServer, TLSFiles, WriteGrantPolicy, read_audit
from pacsys.testing import FakeBackend

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

TOKEN = "t0ken"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key(name, cwd):
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", f"{name}.key", cwd=cwd)


def _ca(name, cwd):
    _key(name, cwd)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=cwd,
    )


def _signed(name, ca, cwd, subject, server=False, san=None):
    _key(name, cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=cwd)
    extra = []
    san = "IP:127.0.0.1,DNS:localhost" if server else san
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", *extra, cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _ca("ca", d)
    _ca("other-ca", d)
    _signed("server", "ca", d, "/CN=localhost", server=True)
    _signed("server2", "other-ca", d, "/CN=localhost", server=True)
    _signed("ops-1", "ca", d, "/O=Test Lab/CN=ops-1")
    _signed("guest", "ca", d, "/O=Test Lab/CN=guest")
    _signed("stranger", "other-ca", d, "/O=Elsewhere/CN=ops-1")
    # Names only in the subject alternative name (the subject is empty).
    _signed("dns-only", "ca", d, "/", san="email:ops@example.org,DNS:ops1.example,IP:10.0.0.1")
    _signed("uri-only", "ca", d, "/", san="DNS:ops2.example,URI:spiffe://example.org/ops/2")
    # A CN that carries an escaped comma and another O (the real O is another), and two CNs.
    _signed("comma", "ca", d, "/O=Elsewhere/CN=ops-x\\, O=Test Lab")
    _signed("two-cns", "ca", d, "/O=Test Lab/CN=guest/CN=ops-1")
    return d


def _pem(pki, name):
    return (pki / name).read_bytes()


def _creds(pki, client=None, ca="ca.crt"):
    if client is None:
        return grpc.ssl_channel_credentials(_pem(pki, ca))
    return grpc.ssl_channel_credentials(_pem(pki, ca), _pem(pki, f"{client}.key"), _pem(pki, f"{client}.crt"))


def _fake():
    fb = FakeBackend()
    fb.set_reading("M:OUTTMP", 72.5)
    return fb


@pytest.fixture
def serve(pki):
    started = []

    def start(backend=None, client_ca=False, **kwargs):
        files = TLSFiles(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt") if client_ca else None)
        server = SupervisedServer(backend or _fake(), port=0, host="127.0.0.1", tls=files, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _read(port, creds, drf="M:OUTTMP@I"):
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return list(DAQ_pb2_grpc.DAQStub(channel).Read(DAQ_pb2.ReadingList(drf=[drf]), timeout=5))


def _set(port, creds, device="Z:ACLTST", value=1.0, token=None):
    request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device=device)])
    request.setting[0].value.scalar = value
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return DAQ_pb2_grpc.DAQStub(channel).Set(request, timeout=5, metadata=metadata)


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_tls_serves_clients_that_trust_its_ca_and_no_plaintext(serve, pki):
    server = serve()
    assert _read(server.port, _creds(pki))[0].readings.reading[0].data.scalar == pytest.approx(72.5)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
        stub = DAQ_pb2_grpc.DAQStub(plain)
        assert _code(lambda: list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=3)))[0] == (
            grpc.StatusCode.UNAVAILABLE
        )
    assert _code(lambda: _read(server.port, _creds(pki, ca="other-ca.crt")))[0] == grpc.StatusCode.UNAVAILABLE


def test_a_token_is_accepted_over_tls_where_plaintext_is_refused(serve, pki):
    fake = _fake()
    server = serve(fake, token=TOKEN, allow_token_plaintext=False)
    assert _set(server.port, _creds(pki), token=TOKEN).status[0].status_code == 0
    assert fake.writes == [("Z:ACLTST", 1.0)]


def test_without_client_certificates_a_certificate_sent_anyway_reaches_no_call(pki):
    """A port that asks for no client certificate (no tls_client_ca) sees none in any call's auth
    context, so its clients are known by address alone: what lets the server remember identities
    per peer string there (`Callers`) without asking gRPC each call."""
    from concurrent.futures import ThreadPoolExecutor

    from pacsys.supervised._tls import ServerTLS

    seen = []

    def auth(request, context):
        seen.append(context.auth_context())
        return b""

    handler = grpc.method_handlers_generic_handler(
        "t.T", {"Auth": grpc.unary_unary_rpc_method_handler(auth, lambda b: b, lambda b: b)}
    )
    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_secure_port(
        "127.0.0.1:0", ServerTLS(TLSFiles(str(pki / "server.crt"), str(pki / "server.key"))).credentials()
    )
    server.start()
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", _creds(pki, "ops-1")) as channel:
            channel.unary_unary("/t.T/Auth")(b"", timeout=5)
    finally:
        server.stop(None)
    (context,) = seen
    assert context["transport_security_type"] == [b"ssl"]
    assert not {"x509_subject", "x509_common_name", "peer_dns", "peer_uri", "peer_email", "peer_ip"} & set(context)


def test_a_plaintext_listener_beside_tls_serves_reads_but_refuses_tokens_and_remote_status(serve, pki):
    """`plaintext_port`: the same services without TLS, for clients that speak plaintext only (the
    pacsys 0.3.0 release); the gate decides per call, so a token stays refused there."""
    import json

    fake = _fake()
    server = serve(fake, token=TOKEN, allow_token_plaintext=False, plaintext_port=0)
    assert server.plaintext_port not in (None, 0, server.port)
    with grpc.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as plain:
        stub = DAQ_pb2_grpc.DAQStub(plain)
        reply = list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=5))
        assert reply[0].readings.reading[0].data.scalar == pytest.approx(72.5)
        request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="Z:ACLTST")])
        request.setting[0].value.scalar = 1.0
        metadata = [("authorization", f"Bearer {TOKEN}")]
        code, details = _code(lambda: stub.Set(request, timeout=5, metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "plaintext" in details
    assert _set(server.port, _creds(pki), token=TOKEN).status[0].status_code == 0  # over TLS
    assert fake.writes == [("Z:ACLTST", 1.0)]
    # The status view answers a local client on either listener (remote ones need the token,
    # which the plaintext listener refuses).
    with grpc.insecure_channel(f"127.0.0.1:{server.plaintext_port}") as plain:
        status = json.loads(plain.unary_unary("/pacsys.supervisor.Admin/Status")(b"", timeout=5))
    assert status["plaintext_address"] == f"127.0.0.1:{server.plaintext_port}"


def test_mutual_tls_identity_reaches_policies_and_the_audit(serve, pki, tmp_path):
    fake = _fake()
    path = str(tmp_path / "audit.jsonl")
    grant = WriteGrantPolicy(["CN=ops-*"], ["Z:*"])
    server = serve(fake, client_ca=True, policies=[grant], audit_log=AuditLog(path))
    assert _set(server.port, _creds(pki, "ops-1")).status[0].status_code == 0
    code, details = _code(lambda: _set(server.port, _creds(pki, "guest")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not approved" in details
    code, _ = _code(lambda: _set(server.port, _creds(pki, "ops-1"), device="M:OUTTMP"))
    assert code == grpc.StatusCode.PERMISSION_DENIED  # ops may write Z:* only
    assert fake.writes == [("Z:ACLTST", 1.0)]
    # No certificate, or one another CA signed (whatever its subject says): no connection.
    assert _code(lambda: _read(server.port, _creds(pki)))[0] == grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: _read(server.port, _creds(pki, "stranger")))[0] == grpc.StatusCode.UNAVAILABLE
    server.servicer.audit.flush()
    sets = [e for e in read_audit(path) if e["dir"] == "in" and e["method"] == "Set"]
    assert [(e["identity"], e["allowed"]) for e in sets] == [
        ("CN=ops-1,O=Test Lab", True),
        ("CN=guest,O=Test Lab", False),
        ("CN=ops-1,O=Test Lab", False),
    ]


def _audited_sets(server, path):
    server.servicer.audit.flush()
    return [(e.get("identity"), e["allowed"]) for e in read_audit(path) if e["dir"] == "in" and e["method"] == "Set"]


def test_a_certificate_with_names_only_in_its_san_is_known_by_its_first_name(serve, pki, tmp_path):
    """Empty subject: the identity is the first SAN name of the kinds URI, DNS, email, IP, in that order."""
    fake = _fake()
    path = str(tmp_path / "audit.jsonl")
    grant = WriteGrantPolicy(["DNS:ops1.example"], ["Z:*"])
    server = serve(fake, client_ca=True, policies=[grant], audit_log=AuditLog(path))
    assert _set(server.port, _creds(pki, "dns-only")).status[0].status_code == 0
    code, _ = _code(lambda: _set(server.port, _creds(pki, "uri-only")))
    assert code == grpc.StatusCode.PERMISSION_DENIED  # another client, not one shared "" identity
    assert fake.writes == [("Z:ACLTST", 1.0)]
    assert _audited_sets(server, path) == [("DNS:ops1.example", True), ("URI:spiffe://example.org/ops/2", False)]


def test_subject_patterns_match_parsed_attributes_and_fail_closed(serve, pki, tmp_path):
    """`CN=ops-*` is a pattern on the CN attribute, not on the subject's text."""
    fake = _fake()
    path = str(tmp_path / "audit.jsonl")
    server = serve(fake, client_ca=True, policies=[WriteGrantPolicy(["CN=ops-*"], ["Z:*"])], audit_log=AuditLog(path))
    assert _set(server.port, _creds(pki, "ops-1")).status[0].status_code == 0
    # The subject's text starts with "CN=ops-x\, O=Test Lab": its CN holds a comma, which no
    # wildcard stands for; and a subject with two CNs matches no pattern that names CN.
    for client in ("comma", "two-cns"):
        code, details = _code(lambda c=client: _set(server.port, _creds(pki, c)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not approved" in details, client
    assert fake.writes == [("Z:ACLTST", 1.0)]
    assert _audited_sets(server, path) == [
        ("CN=ops-1,O=Test Lab", True),
        ("CN=ops-x\\, O=Test Lab,O=Elsewhere", False),
        ("CN=ops-1,CN=guest,O=Test Lab", False),
    ]


def test_through_a_trusted_proxy_the_client_is_the_forwarded_address_not_the_proxys_certificate(serve, pki, tmp_path):
    """`trusted_proxies`: a proxy under mutual TLS presents its own certificate (here ops-1's);
    a call it forwards is the forwarded address for host grants and the audit, so a subject
    grant never matches through it (fail closed). A call without the header is the proxy
    host's own, known by its certificate."""
    fake = _fake()
    path = str(tmp_path / "audit.jsonl")
    grants = [WriteGrantPolicy(["ipv4:192.0.2.1"], ["Z:*"]), WriteGrantPolicy(["CN=ops-*"], ["Z:*"])]
    server = serve(fake, client_ca=True, policies=grants, audit_log=AuditLog(path), trusted_proxies=["127.0.0.1"])

    def forwarded_set(client: str | None) -> grpc.StatusCode:
        metadata = [("x-forwarded-for", client)] if client else None
        request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="Z:ACLTST")])
        request.setting[0].value.scalar = 1.0
        with grpc.secure_channel(f"127.0.0.1:{server.port}", _creds(pki, "ops-1")) as channel:
            try:
                DAQ_pb2_grpc.DAQStub(channel).Set(request, timeout=5, metadata=metadata)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert forwarded_set("192.0.2.1") == grpc.StatusCode.OK  # the host grant
    assert forwarded_set("192.0.2.2") == grpc.StatusCode.PERMISSION_DENIED  # not the proxy's CN=ops-1
    assert forwarded_set(None) == grpc.StatusCode.OK  # the proxy's host itself: its certificate
    assert _audited_sets(server, path) == [
        ("ipv4:192.0.2.1", True),
        ("ipv4:192.0.2.2", False),
        ("CN=ops-1,O=Test Lab", True),
    ]
    server.servicer.audit.flush()
    peers = [e["peer"] for e in read_audit(path) if e["dir"] == "in" and e["method"] == "Set"]
    assert peers[:2] == ["ipv4:192.0.2.1:0", "ipv4:192.0.2.2:0"] and peers[2].startswith("ipv4:127.0.0.1:")


def test_an_ipv6_client_is_known_as_documented(tmp_path):
    """`ipv6:[::1]`, brackets and all (gRPC's peer string has them percent-encoded)."""
    fake = _fake()
    path = str(tmp_path / "audit.jsonl")
    grant = WriteGrantPolicy(["ipv6:[::1]"], ["Z:*"])
    server = SupervisedServer(fake, port=0, host="[::1]", policies=[grant], audit_log=AuditLog(path))
    server.start()
    try:
        request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="Z:ACLTST")])
        request.setting[0].value.scalar = 1.0
        with grpc.insecure_channel(f"[::1]:{server.port}") as channel:
            assert DAQ_pb2_grpc.DAQStub(channel).Set(request, timeout=5).status[0].status_code == 0
        assert fake.writes == [("Z:ACLTST", 1.0)]
        assert _audited_sets(server, path) == [("ipv6:[::1]", True)]
    finally:
        server.stop()


def test_mutual_tls_limits_count_per_identity(serve, pki):
    from pacsys.supervised import ServicerLimits

    server = serve(client_ca=True, limits=ServicerLimits(max_streams_per_peer=1))
    with grpc.secure_channel(f"127.0.0.1:{server.port}", _creds(pki, "ops-1")) as ops:
        call = DAQ_pb2_grpc.DAQStub(ops).Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=30)
        wait_for(lambda: server.servicer.active_streams == 1, what="the first stream")
        code, details = _code(lambda: _read(server.port, _creds(pki, "ops-1"), "M:OUTTMP@p,1000"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "CN=ops-1" in details
        # Same host, another certificate: another client.
        with grpc.secure_channel(f"127.0.0.1:{server.port}", _creds(pki, "guest")) as guest:
            other = DAQ_pb2_grpc.DAQStub(guest).Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=30)
            wait_for(lambda: server.servicer.active_streams == 2, what="the other client's stream")
            other.cancel()
        call.cancel()


def test_a_renewed_certificate_serves_new_connections_after_reload(serve, pki, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(_pem(pki, "server.crt"))
    key.write_bytes(_pem(pki, "server.key"))
    server = SupervisedServer(_fake(), port=0, host="127.0.0.1", tls=TLSFiles(str(cert), str(key)))
    server.start()
    try:
        assert len(_read(server.port, _creds(pki))) == 1
        cert.write_bytes(_pem(pki, "server2.crt"))
        key.write_bytes(_pem(pki, "server2.key"))
        server.tls.reload()
        for _ in range(32):  # new connections, over most of the port's 16 servers (accept_loops)
            assert len(_read(server.port, _creds(pki, ca="other-ca.crt"))) == 1
        assert _code(lambda: _read(server.port, _creds(pki)))[0] == grpc.StatusCode.UNAVAILABLE
        cert.write_text("not a certificate")
        with pytest.raises(ValueError):
            server.tls.reload()  # refused: the running configuration stays
        assert len(_read(server.port, _creds(pki, ca="other-ca.crt"))) == 1
    finally:
        server.stop()


def test_the_grpc_backend_reaches_an_upstream_over_mutual_tls(serve, pki):
    upstream = serve(client_ca=True, policies=[WriteGrantPolicy(["CN=ops-1*"], ["Z:*"])])
    spec = f"grpc://127.0.0.1:{upstream.port}?ca={pki / 'ca.crt'}&cert={pki / 'ops-1.crt'}&key={pki / 'ops-1.key'}"
    backend = build_backend(spec)

    async def use():
        try:
            readings = await backend.get_many(["M:OUTTMP@I"], timeout=5)
            results = await backend.write_many([("Z:ACLTST", 2.0)], timeout=5)
            return readings, results
        finally:
            await backend.close()

    readings, results = asyncio.run(use())
    assert readings[0].value == pytest.approx(72.5)
    assert results[0].error_code == 0
    plain = build_backend(f"grpc://127.0.0.1:{upstream.port}?ca={pki / 'ca.crt'}")  # TLS, no client certificate

    async def refused():
        try:
            await plain.get_many(["M:OUTTMP@I"], timeout=3)
        finally:
            await plain.close()

    with pytest.raises(Exception):  # noqa: B017 - the handshake fails: unavailable or timed out
        asyncio.run(refused())


def test_the_command_serves_tls_takes_tokens_over_it_only_and_reloads_its_certificate(pki, tmp_path):
    import signal

    from processes import FAKE, Supervisor

    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(_pem(pki, "server.crt"))
    key.write_bytes(_pem(pki, "server.key"))
    config = tmp_path / "supervisor.toml"
    config.write_text(f'allow_writes = ["Z:*"]\ntoken = "{TOKEN}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    sup = Supervisor(*FAKE, "--config", str(config))  # host [::]: no token over plaintext
    try:
        port = sup.wait_serving()
        loaded = sup.wait_line("stderr", r'event=tls_certificate_loaded .*serial=(\w+) .*not_after="?([^"\s]+)')
        assert (f"serial={loaded[1]}", f"notAfter={loaded[2]}") == _serial_and_expiry(cert)
        assert _set(port, _creds(pki), token=TOKEN).status[0].status_code == 0
        cert.write_bytes(_pem(pki, "server2.crt"))
        key.write_bytes(_pem(pki, "server2.key"))
        mark = sup.mark()
        sup.proc.send_signal(signal.SIGHUP)
        sup.wait_line("stderr", r"level=INFO .*event=config_reloaded ", start=mark)
        assert len(_read(port, _creds(pki, ca="other-ca.crt"))) == 1
        # A key that is not the certificate's: the reload is refused, naming the file and why;
        # the running pair serves on.
        key.write_bytes(_pem(pki, "server.key"))
        mark = sup.mark()
        sup.proc.send_signal(signal.SIGHUP)
        refused = sup.wait_line("stderr", r"level=ERROR .*event=config_reload_failed .*", start=mark)[0]
        assert f"'tls_key' {key}: does not match the certificate {cert}" in refused.replace("\\'", "'"), refused
        assert len(_read(port, _creds(pki, ca="other-ca.crt"))) == 1
    finally:
        sup.kill()
    config.write_text(f'allow_writes = ["Z:*"]\ntoken = "{TOKEN}"\n')
    plain = Supervisor(*FAKE, "--config", str(config))
    try:
        port = plain.wait_serving()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="Z:ACLTST")])
            request.setting[0].value.scalar = 1.0
            stub = DAQ_pb2_grpc.DAQStub(channel)
            metadata = [("authorization", f"Bearer {TOKEN}")]
            code, details = _code(lambda: stub.Set(request, timeout=10, metadata=metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "plaintext" in details
    finally:
        plain.kill()


def test_probe_and_status_reach_a_mutual_tls_service(serve, pki, capsys):
    from pacsys.supervised.cli import main

    server = serve(client_ca=True)
    addr = f"127.0.0.1:{server.port}"
    tls = ["--ca", str(pki / "ca.crt"), "--cert", str(pki / "ops-1.crt"), "--key", str(pki / "ops-1.key")]
    assert main(["probe", "--addr", addr, "--timeout", "5", *tls]) == 0
    assert main(["status", "--addr", addr, "--json", *tls]) == 0
    assert '"ready": true' in capsys.readouterr().out
    assert main(["probe", "--addr", addr, "--timeout", "2"]) == 2  # plaintext: no answer


def _serial_and_expiry(cert):
    """What openssl says of a certificate: its serial and expiry, in the service's log format."""
    import datetime

    out = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-serial", "-enddate"], capture_output=True, text=True
    )
    serial, end = out.stdout.split()[0], out.stdout.strip().split("notAfter=")[1]
    expiry = datetime.datetime.strptime(end, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=datetime.UTC)
    return serial, f"notAfter={expiry.isoformat()}"


@pytest.fixture(scope="module")
def broken(pki):
    """TLS files a service cannot use, each beside the pki's good ones."""
    d = pki / "broken"
    d.mkdir(exist_ok=True)
    (d / "garbage.crt").write_text("-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSBpbnNpZGU=\n-----END CERTIFICATE-----\n")
    (d / "chain-garbage.crt").write_bytes(_pem(pki, "server.crt") + (d / "garbage.crt").read_bytes())
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-aes256",
             "-pass", "pass:secret", "-out", "encrypted.key", cwd=d)  # fmt: skip
    (d / "chain.crt").write_bytes(_pem(pki, "server.crt") + _pem(pki, "ca.crt"))
    return d


@pytest.mark.parametrize(
    ("cert", "key", "client_ca", "setting", "reason"),
    [
        ("broken/garbage.crt", "server.key", None, "tls_cert", "the certificate does not decode"),
        ("broken/chain-garbage.crt", "server.key", None, "tls_cert", "certificate 2 of 2 does not decode"),
        ("server.key", "server.key", None, "tls_cert", "a private key, not a certificate"),
        ("missing.crt", "server.key", None, "tls_cert", "cannot read it: No such file or directory"),
        ("server.crt", "server2.key", None, "tls_key", "does not match the certificate {cert}"),
        ("server.crt", "ops-1.key", None, "tls_key", "does not match the certificate {cert}"),
        ("server.crt", "server.crt", None, "tls_key", "not a private key that decodes"),
        ("server.crt", "broken/encrypted.key", None, "tls_key", "the key is encrypted"),
        ("server.crt", "server.key", "broken/garbage.crt", "tls_client_ca", "the certificate does not decode"),
        ("server.crt", "server.key", "server.key", "tls_client_ca", "a private key, not a certificate"),
    ],
)
def test_tls_files_are_checked_as_a_pair_naming_the_file_and_the_reason(
    pki, broken, cert, key, client_ca, setting, reason
):
    from pacsys.supervised._tls import TLSFileError

    files = TLSFiles(str(pki / cert), str(pki / key), str(pki / client_ca) if client_ca else None)
    with pytest.raises(TLSFileError) as info:
        files.check()
    path = {"tls_cert": files.cert, "tls_key": files.key, "tls_client_ca": files.client_ca}[setting]
    assert info.value.key == setting
    assert str(info.value).startswith(f"'{setting}' {path}: " + reason.format(cert=files.cert)), str(info.value)


def test_good_tls_files_pass_the_check(pki, broken):
    for files in (
        TLSFiles(str(pki / "server.crt"), str(pki / "server.key")),
        TLSFiles(str(broken / "chain.crt"), str(pki / "server.key"), str(pki / "ca.crt")),  # leaf, then its CA
    ):
        certificate = files.check()
        assert (f"serial={certificate.serial}", f"notAfter={certificate.not_after.isoformat()}") == _serial_and_expiry(
            pki / "server.crt"
        )


def test_a_mismatched_key_is_a_configuration_error_at_start_and_in_check_config(pki, tmp_path):
    from processes import FAKE, run_cli

    cert, key = pki / "server.crt", pki / "server2.key"
    started = run_cli(*FAKE, "--host", "127.0.0.1", "--tls-cert", str(cert), "--tls-key", str(key))
    assert started.returncode == 2, started.stderr  # not 3 ("cannot listen"): systemd must not retry it
    expected = f"'tls_key' {key}: does not match the certificate {cert}"
    assert expected in started.stderr and "listen" not in started.stderr, started.stderr
    config = tmp_path / "supervisor.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    checked = run_cli("check-config", str(config))
    assert checked.returncode == 2 and expected in checked.stderr, checked.stdout + checked.stderr
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{pki / "server.key"}"\n')
    checked = run_cli("check-config", "-q", str(config))
    assert checked.returncode == 0, checked.stderr
    serial, _ = _serial_and_expiry(cert)
    assert f"{cert}: serial {serial.removeprefix('serial=')}, valid from " in checked.stdout, checked.stdout


def _ops_guide_block(first_line):
    """The code block of ops/README.md that starts with `first_line`, as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "ops" / "README.md").read_text()
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        if block.startswith(first_line + "\n"):
            return block
    raise AssertionError(f"ops/README.md: no code block starting with {first_line!r}")


def test_the_ops_guides_openssl_recipe_serves_mutual_tls_by_name_and_address(tmp_path, capsys):
    """The guide's openssl block, run as written, makes files the command serves mutual TLS with; probe
    reaches it by its address and, with --server-name, by its name; and says which option is missing."""
    import os

    from processes import FAKE, Supervisor

    from pacsys.supervised.cli import main

    env = {**os.environ, "NAME": "daq-gw.test", "IP": "127.0.0.1"}  # a name never resolved: --server-name
    made = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _ops_guide_block("umask 077")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    tls = [f"--tls-{name}" for name in ("cert", "key", "client-ca")]
    files = [str(tmp_path / name) for name in ("server.crt", "server.key", "ca.crt")]
    sup = Supervisor(*FAKE, "--host", "127.0.0.1", *(x for pair in zip(tls, files, strict=True) for x in pair))
    try:
        port = sup.wait_serving()
        addr = ["--addr", f"127.0.0.1:{port}", "--timeout", "5"]
        ca = ["--ca", str(tmp_path / "ca.crt")]
        client = [*ca, "--cert", str(tmp_path / "ops-1.crt"), "--key", str(tmp_path / "ops-1.key")]

        def probe(*args):
            code = main(["probe", *addr, *args])
            return code, capsys.readouterr().out

        assert probe(*client) == (0, f"127.0.0.1:{port}: SERVING\n")  # the certificate's IP entry
        assert probe(*client, "--server-name", "daq-gw.test")[0] == 0  # its DNS entry
        assert main(["status", *addr, *client, "--server-name", "daq-gw.test", "--json"]) == 0
        assert '"ready": true' in capsys.readouterr().out
        # Each thing left out, named.
        for args, hint in (
            ((), "pass --ca FILE"),
            ((*client, "--server-name", "other.test"), "pass --server-name NAME"),
            (ca, "pass --cert and --key"),
        ):
            code, out = probe(*args)
            assert code == 2 and hint in out, (args, out)
        # A client of the guide's certificates reads through the service.
        creds = grpc.ssl_channel_credentials(*(_pem(tmp_path, f) for f in ("ca.crt", "ops-1.key", "ops-1.crt")))
        assert len(_read(port, creds)) == 1
    finally:
        sup.kill()
