"""ddr-provision: make every asset the experiment needs available under <data_root>/assets/."""

from __future__ import annotations

from prefect import flow, get_run_logger

from ddr.provision import describe, provision
from flows.common import load


@flow(name="ddr-provision")
def provision_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, str]:
    """Download (hub, URL, Google Drive), copy (local) or generate (tiny, sd14-random, random SAE) the assets."""
    config = load(overrides, config_file)
    paths = describe(provision(config))
    get_run_logger().info("provisioned: %s", paths)
    return paths
