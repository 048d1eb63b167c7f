"""The supervised DAQ gateway: policies, audit, and the server.

`SupervisedServer(backend)` serves the DAQ gRPC service around any Backend or
AsyncBackend. As a library it denies nothing unless given policies; the
`pacsys-supervisor` command denies writes unless a policy grants them.
"""

from pacsys.supervised._audit import AuditLimits, AuditLog, audit_files, read_audit, read_audit_proto
from pacsys.supervised._machine_protection import SlewLimit, SlewRatePolicy, ValueRangePolicy
from pacsys.supervised._managed import CountsSubscriptions, ManagedBackend
from pacsys.supervised._policies import (
    CurrentValue,
    DeviceAccessPolicy,
    Policy,
    PolicyDecision,
    RateLimitPolicy,
    ReadOnlyPolicy,
    RequestContext,
    WriteGrantPolicy,
    evaluate_policies,
    write_gate,
)
from pacsys.supervised._server import SupervisedServer
from pacsys.supervised._tls import TLSFiles
from pacsys.supervised._transport import TransportLimits
from pacsys.supervised.gate import ServicerLimits

__all__ = [
    "AuditLimits",
    "AuditLog",
    "CountsSubscriptions",
    "CurrentValue",
    "DeviceAccessPolicy",
    "ManagedBackend",
    "Policy",
    "PolicyDecision",
    "RateLimitPolicy",
    "ReadOnlyPolicy",
    "RequestContext",
    "ServicerLimits",
    "SlewLimit",
    "SlewRatePolicy",
    "SupervisedServer",
    "TLSFiles",
    "TransportLimits",
    "ValueRangePolicy",
    "WriteGrantPolicy",
    "audit_files",
    "evaluate_policies",
    "read_audit",
    "read_audit_proto",
    "write_gate",
]
