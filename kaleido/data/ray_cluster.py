"""The Ray cluster the data stages run on (params.yaml `data.ray_address`): connect once, know its GPUs.

`data.ray_address`: "local" starts a Ray instance inside this process's machine (loopback only); "auto" joins
the cluster this process runs in (a Ray job's driver on a KubeRay head); anything else is a cluster address
(`host:6379`, or `ray://host:10001` for Ray Client).
"""

from __future__ import annotations

from typing import Any

from kaleido.config.schema import Params


def connect(params: Params) -> Any:
    """`ray` connected to data.ray_address (a no-op when already connected); returns the module."""
    import ray

    if not ray.is_initialized():
        address = params.data.ray_address
        if address == "local":
            # the node on loopback: Ray binds to the host's interface unless its node IP is given
            ray.init(num_cpus=params.data.workers, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def cluster_gpus(params: Params) -> int:
    """GPUs the Ray cluster has now (its autoscaler may add more: KubeRay's maxReplicas is what --plan assumes)."""
    ray = connect(params)
    return int(ray.cluster_resources().get("GPU", 0))
