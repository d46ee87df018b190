"""Ray's `fake_multinode` provider with one runtime_env directory per fake node (the local cluster's provider).

Why: Ray's fake worker nodes are raylets on one machine that share the head's session dir, so stock
`fake_multinode` gives every node the same `<session>/runtime_resources`. Each node has its own runtime_env agent,
and the working_dir plugin unpacks a job's package with `overwrite=True`: the first time a node sees a package it
deletes the directory and unpacks it again. Nodes that the autoscaler adds while a job runs (or that a later job of
the same checkout adds) thus delete the working dir that workers on the other nodes run in: they fail with
FileNotFoundError from os.getcwd / os.path.abspath, or ModuleNotFoundError while the package is being unpacked
again (issue #23 item 0). On a real cluster every node has its own disk, so this is an artefact of faking nodes:
here each fake node gets `<session>/runtime_resources_<node>`, like a disk of its own.

`clipdense cluster up --local` puts this class into the autoscaler's copy of cluster/local.yaml
(`provider.type: external`); everything else is Ray's FakeMultiNodeProvider.
"""
from __future__ import annotations

import copy
import json

import ray
import ray._private.ray_constants as ray_constants
from ray._common.network_utils import build_address
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)


def runtime_env_dir_name(node_id: str) -> str:
    """The runtime_env directory (under the shared session dir) of one fake node."""
    return f"{ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME}_{node_id[-5:]}"


class OwnDirFakeNodeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose worker nodes each unpack runtime_env packages into a directory of their own."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # Ray 2.60's FakeMultiNodeProvider._create_node_with_resources_and_labels, plus runtime_env_dir_name.
        resources = copy.deepcopy(resources)
        gcs_address = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            ray_params = ray._private.parameter.RayParams(
                min_worker_port=0,
                max_worker_port=0,
                dashboard_port=None,
                dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources,
                labels=labels,
                redis_address=gcs_address,
                gcs_address=gcs_address,
                runtime_env_dir_name=runtime_env_dir_name(next_id),
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            all_tags = {
                TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                TAG_RAY_USER_NODE_TYPE: node_type,
                TAG_RAY_NODE_NAME: next_id,
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
            }
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}
