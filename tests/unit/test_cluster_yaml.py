"""cluster.yaml is a valid Ray cluster-launcher config with CPU and GPU autoscaling types and nothing open to the world."""
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load(CLUSTER.read_text())
    validate_config(cfg)  # raises jsonschema.ValidationError on a bad config
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 0]
    assert gpu and cpu
    for t in [*gpu, *(types[n] for n in cpu)]:
        assert t["min_workers"] < t["max_workers"]  # autoscaling
        assert any("pip install" in c for c in t["worker_setup_commands"])  # installs the project


def test_cluster_yaml_opens_nothing_to_the_world():
    cfg = yaml.safe_load(CLUSTER.read_text())
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    for perm in cfg["provider"]["security_group"]["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm["IpRanges"])


def test_schema_check_is_real():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load(CLUSTER.read_text())
    cfg["available_node_types"]["gpu_worker"]["max_worker"] = 3  # typo
    with pytest.raises(jsonschema.ValidationError):
        validate_config(cfg)
