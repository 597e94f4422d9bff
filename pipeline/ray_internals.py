"""The one place glcic reaches into Ray's private modules, each use with why no public API serves.

Ray may move or rename these in any release; ``tests/test_layering.py`` imports each one, so an
upgrade that moves one fails there, by name, rather than silently changing behaviour.
"""

from __future__ import annotations


def autoscaler_max_resources() -> dict | None:
    """The resources the cluster's autoscaler says it can grow to, or None if it says nothing.

    Why private: the autoscaler v2 and KubeRay publish their node types in the GCS, and Ray Data
    sizes its own actor pools from them through this same function; Ray 2.60 has no public API
    for it (``ray.cluster_resources()`` is what is up now, not what can be added). Any failure
    means "unknown", which the actor pool treats as Ray's default autoscaler (no report).
    """
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001
        return None
