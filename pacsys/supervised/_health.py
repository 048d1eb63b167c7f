"""What the service port tells about itself: grpc.health.v1 (Check, Watch and List) and
server reflection (grpc.reflection.v1 and v1alpha).

grpcio-health-checking (1.85) implements Check and Watch; its List answers UNIMPLEMENTED
and makes gRPC log the servicer's NotImplementedError at ERROR. List is implemented here:
every service with a status, as Check would answer it.

grpcio-reflection (1.85) ships only v1alpha. v1 is the same protocol under another package
name (its messages have the same fields and numbers), so the v1alpha servicer answers both;
grpcurl and other current clients ask for v1 first.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["HEALTH_SERVICE", "REFLECTION_SERVICES", "HealthServicer", "enable_reflection"]

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_SERVICES = (REFLECTION_V1, reflection.SERVICE_NAME)


class HealthServicer(health_aio.HealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()
            }
        )


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha for `service_names` (the reflection services are added)."""
    names = (*service_names, *REFLECTION_SERVICES)
    reflection.enable_server_reflection(names, server)  # v1alpha, under its own name
    servicer = reflection.aio.ReflectionServicer(names)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )
