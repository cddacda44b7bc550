"""Shared fixtures; Vulkan tests skip without a device unless DEPLOYTOOL_REQUIRE_VULKAN=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`vulkan` tests need a Vulkan device (required when DEPLOYTOOL_REQUIRE_VULKAN=1); `cpp` tests need
    libncnn built by `make ncnn` (required when CI=true)."""
    if item.get_closest_marker("vulkan") is not None:
        from deploytool.backends.ncnn_runner import vulkan_device_name

        if vulkan_device_name() is None:
            reason = "ncnn sees no Vulkan device (apt-get install -y libvulkan1 mesa-vulkan-drivers)"
            if os.environ.get("DEPLOYTOOL_REQUIRE_VULKAN") == "1":
                pytest.fail(f"DEPLOYTOOL_REQUIRE_VULKAN=1 but {reason}")
            pytest.skip(reason)
    if item.get_closest_marker("cpp") is not None:
        from deploytool.targets.build import runner_available

        ok, reason = runner_available()
        if not ok:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true but the C++ runner cannot be built: {reason}")
            pytest.skip(reason)


@pytest.fixture(scope="session")
def resnet_run(tmp_path_factory):
    """One real `run` of resnet18 through all four backends, shared by the end-to-end tests."""
    from deploytool.options import RunOptions
    from deploytool.pipeline import run
    from deploytool.spec_toml import load_spec

    out = tmp_path_factory.mktemp("resnet18")
    report = run(load_spec("resnet18"), RunOptions(out=out, images=(IMAGES,))).to_dict()
    return out, report


# The aarch64 test board (tests/sshd.py): an sshd on 127.0.0.1 whose runner executes under qemu-aarch64,
# one per test module that asks for it; and the cross-built runner it gets.
@pytest.fixture(scope="module")
def arm_board():
    import sshd

    yield from sshd.arm_board()


@pytest.fixture(scope="module")
def arm_runner():
    import sshd

    return sshd.arm_runner()
