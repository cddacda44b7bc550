"""Shared fixtures; Vulkan tests skip without a device unless DEPLOYTOOL_REQUIRE_VULKAN=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("vulkan") is None:
        return
    from deploytool.backends.ncnn_runner import vulkan_device_name

    if vulkan_device_name() is None:
        reason = "ncnn sees no Vulkan device (apt-get install -y libvulkan1 mesa-vulkan-drivers)"
        if os.environ.get("DEPLOYTOOL_REQUIRE_VULKAN") == "1":
            pytest.fail(f"DEPLOYTOOL_REQUIRE_VULKAN=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def resnet_run(tmp_path_factory):
    """One real `run` of resnet18 through all four backends, shared by the end-to-end tests."""
    from deploytool.pipeline import RunOptions, run
    from deploytool.spec import load_spec

    out = tmp_path_factory.mktemp("resnet18")
    report = run(load_spec("resnet18"), RunOptions(out=out, images=[IMAGES]))
    return out, report
