"""The client's address behind haproxy (`trusted_proxies`), through real haproxy.

Two instances as shipped (benchmarks/pair.py: ops/supervisor.container.toml, TLS, listening on
`[::]`) behind ops/haproxy.cfg, given haproxy's address as their trusted proxy, as
ops/compose.yaml does. On loopback every process is 127.0.0.1, so haproxy connects to the
instances from an address of its own (`source 127.0.0.2`), as a proxy on its own host does;
clients then reach the instances directly from 127.0.0.1, an address that is not trusted.

To stand for two remote clients, the test adds two frontends that tag their calls with
different forwarded addresses (192.0.2.1 and 192.0.2.2, documentation addresses: nothing is
sent there); the shipped frontend `daq` is used as it is.

- One client exhausting its stream budget (`max_streams_per_peer`, 2 per instance here) is
  refused, by its own address, and the other client is still served: each is a client of
  its own, not haproxy.
- The status view refuses a forwarded remote client without the token (haproxy runs on this
  host, but the client it forwards does not), and answers it with the token (over TLS).
- Through the shipped frontend a client's own x-forwarded-for is removed: the instances see
  its real address. A direct client's header is ignored. A trusted proxy's header that is not
  an address is refused, naming it.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator

import grpc
import pytest

from benchmarks.pair import Pair, free_port, verified_name
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

PROXY_SOURCE = "127.0.0.2"  # haproxy's address towards the instances
TAGS = {"one": "192.0.2.1", "two": "192.0.2.2", "bogus": "not-an-address"}
STREAMS_PER_PEER = 2
STATUS = "/pacsys.supervisor.Admin/Status"


def tagging_frontends(ports: dict[str, int]):
    """The rendered ops/haproxy.cfg, connecting from PROXY_SOURCE, with one frontend per tag."""

    def edit(text: str) -> str:
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.strip().startswith("default-server proto h2"))
        lines[at] += f" source {PROXY_SOURCE}"
        for tag, port in ports.items():
            lines += [
                f"frontend tagged_{tag}",
                f"    bind 127.0.0.1:{port} proto h2",
                f"    http-request set-header x-forwarded-for {TAGS[tag]}",
                "    default_backend supervisors",
            ]
        return "\n".join(lines) + "\n"

    return edit


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ports = {tag: free_port() for tag in TAGS}
    p = Pair(
        tmp_path_factory.mktemp("trusted-proxies"),
        "--trusted-proxies", PROXY_SOURCE,
        "--max-streams-per-peer", str(STREAMS_PER_PEER),
        edit_haproxy_cfg=tagging_frontends(ports),
    )  # fmt: skip
    p.tagged = ports
    try:
        p.start()
        yield p
    finally:
        p.close()


def channel_to(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


class Streams:
    """Streams opened one at a time through one channel, each waited for: a reading or a refusal."""

    def __init__(self, channel: grpc.Channel):
        self.stub = DAQ_pb2_grpc.DAQStub(channel)
        self.open: list = []

    def open_one(self, k: int) -> grpc.RpcError | None:
        stream = self.stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{k:03d}@p,200"]), timeout=60)
        try:
            next(stream)
        except grpc.RpcError as exc:
            return exc
        self.open.append(stream)
        return None

    def close(self) -> None:
        for stream in self.open:
            stream.cancel()


@pytest.fixture
def streams() -> Iterator[list[Streams]]:
    made: list[Streams] = []
    yield made
    for s in made:
        s.close()


def test_a_client_exhausting_its_budget_leaves_another_client_served(pair, streams):
    with channel_to(pair.tagged["one"]) as one, channel_to(pair.tagged["two"]) as two:
        first, second = Streams(one), Streams(two)
        streams += [first, second]
        refused = None
        for k in range(4 * STREAMS_PER_PEER):  # haproxy spreads them over both instances
            refused = first.open_one(k)
            if refused is not None:
                break
        assert refused is not None, "the first client was never refused"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "too many open streams from ipv4:192.0.2.1 " in refused.details(), refused.details()
        assert len(first.open) >= STREAMS_PER_PEER
        # The other client is a client of its own: its streams are served.
        for k in range(STREAMS_PER_PEER):
            assert second.open_one(100 + k) is None
    audited = [
        json.loads(line)
        for name in ("a", "b")
        for line in (pair.workdir / f"audit-{name}.jsonl").read_text().splitlines()
        if '"Read"' in line
    ]
    peers = {entry["peer"] for entry in audited if "peer" in entry}
    assert {"ipv4:192.0.2.1:0", "ipv4:192.0.2.2:0"} <= peers, peers
    assert not any(peer.startswith(f"ipv4:{PROXY_SOURCE}:") for peer in peers), peers


def status(port: int, token: str | None = None) -> grpc.RpcError | dict:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel_to(port) as channel:
        try:
            return json.loads(channel.unary_unary(STATUS)(b"", timeout=10, metadata=metadata))
        except grpc.RpcError as exc:
            return exc


def test_the_status_view_refuses_a_forwarded_remote_client_without_the_token(pair):
    refused = status(pair.tagged["one"])
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused
    assert isinstance(status(pair.tagged["one"], pair.token), dict)  # the token, carried over TLS by haproxy
    # A client on this host through the shipped frontend is a local client, as it is directly.
    assert isinstance(status(pair.port), dict)


def test_a_clients_own_header_is_removed_by_haproxy_and_ignored_directly(pair, streams):
    forged = [("x-forwarded-for", "192.0.2.66")]
    with channel_to(pair.port) as through:
        stream = DAQ_pb2_grpc.DAQStub(through).Read(
            DAQ_pb2.ReadingList(drf=["Z:SIM200@p,200"]), timeout=60, metadata=forged
        )
        next(stream)
        credentials = grpc.ssl_channel_credentials(pair.certificates.ca.read_bytes())
        options = [("grpc.ssl_target_name_override", verified_name()), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(pair.a.addr, credentials, options=options) as direct:
            own = DAQ_pb2_grpc.DAQStub(direct).Read(
                DAQ_pb2.ReadingList(drf=["Z:SIM201@p,200"]), timeout=60, metadata=forged
            )
            next(own)
            rows = [row for i in (pair.a, pair.b) for row in status_rows(i)]
            own.cancel()
        stream.cancel()
    peers = {row["drfs"]: row["peer"] for row in rows}
    # Through haproxy: the client's real address (haproxy replaced the header); directly: its own.
    assert peers["Z:SIM200@p,200"] == "ipv4:127.0.0.1:0", rows
    assert peers["Z:SIM201@p,200"].startswith("ipv4:127.0.0.1:") and peers["Z:SIM201@p,200"] != "ipv4:127.0.0.1:0"


def status_rows(instance) -> list[dict]:
    """The open streams an instance's status view lists (asked over its plaintext listener, locally)."""
    found = status(instance.plaintext_port)
    assert isinstance(found, dict), found
    return found["streams"]


def test_a_trusted_proxys_header_that_is_not_an_address_is_refused_naming_it(pair):
    with channel_to(pair.tagged["bogus"]) as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Read(DAQ_pb2.ReadingList(drf=["Z:SIM000@I"]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-forwarded-for from a trusted proxy must end with the client's address, got 'not-an-address'" in (
        refused.value.details()
    )
