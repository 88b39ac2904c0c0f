"""The local Ray cluster ``darkroom serve`` starts (and the tests): every port on loopback.

Ray 2.60 decides where its servers listen from the node's IP address, and ``ray.init`` turns a
loopback ``_node_ip_address`` into the machine's outside address on purpose
(``services.resolve_ip_for_localhost``): passing ``127.0.0.1`` binds nothing to loopback. The
one switch that makes Ray pick the loopback address for a node is Ray's own for single-machine
laptops, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` ("no multi-node cluster on this machine";
read by ``services.get_node_ip_address``): then the GCS, raylet, object manager, core workers,
the dashboard agent, the runtime-env agent and the metrics exporter listen on 127.0.0.1 only
(measured here with ``/proc/net/tcp``; ``tests/integration/test_operations.py`` checks it).

One server ignores the node address: each Serve replica's inter-deployment gRPC server binds
``[::]:0`` (every interface) unconditionally in Ray 2.60 (``ray/serve/_private/replica.py``).
:func:`bind_replica_grpc_to_loopback` (called where our deployments are imported, i.e. in
every replica) rebinds it to ``127.0.0.1`` when the node itself is on loopback; on a real
multi-node cluster it leaves Ray's choice alone (other nodes must reach the replica).

A cluster joined through ``RAY_ADDRESS`` keeps its own settings.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK_ENV = {
    # Ray's single-machine mode: node address = loopback, so its servers bind 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # The Serve proxy's middleware: a request whose Ingress replica died mid-call gets 503 +
    # Retry-After instead of the proxy's empty 500 (deployments/proxy.py).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy:middlewares",
}
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def init_kwargs(*, metrics_port: int | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments of a fresh local cluster: no dashboard (its jobs API runs code for
    whoever reaches it, CVE-2023-48022), Ray's metrics exporter on ``metrics_port`` when given."""
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False}
    if metrics_port is not None:
        kwargs["_metrics_export_port"] = metrics_port
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    return kwargs


def start_local_cluster(*, metrics_port: int | None = None, num_cpus: int | None = None, **ray_kwargs: Any) -> Any:
    """Start a new local Ray cluster (never join one) whose processes listen on loopback only.

    The environment is set before ``ray.init`` so every process the cluster starts inherits it;
    Ray reads the loopback switch at import, so a driver that imported Ray earlier gets the same
    value set on the module too.
    """
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # what the environment says, for an already imported Ray
    context = ray.init(**init_kwargs(metrics_port=metrics_port, num_cpus=num_cpus), **ray_kwargs)
    address = ray.util.get_node_ip_address()
    if address not in _LOOPBACK:
        logger.warning("the local Ray node is on %s, not loopback: its ports may be reachable from outside", address)
    return context


def bind_replica_grpc_to_loopback() -> None:
    """In a Serve replica on a loopback node, make Serve's inter-deployment gRPC server listen on
    127.0.0.1 instead of every interface (see the module doc). Does nothing elsewhere."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:  # a Ray without that module: nothing of ours to fix
        return
    if not ray.is_initialized() or ray.util.get_node_ip_address() not in _LOOPBACK:
        return
    original = replica.add_port_to_grpc_server
    if getattr(original, "_darkroom_loopback", False):
        return

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._darkroom_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


__all__ = ["LOOPBACK_ENV", "bind_replica_grpc_to_loopback", "init_kwargs", "start_local_cluster"]
