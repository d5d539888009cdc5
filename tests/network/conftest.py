"""The ``lab`` fixture: a fresh compose.netns.Lab per test, skipped with a reason where namespaces cannot work.

Needs root (network namespaces, nftables) and the ``ip`` and ``nft`` commands
(Debian packages iproute2 and nftables, which .ci/run installs). On failure
the lab's work directory (every spawned process's log) is kept and named.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator

import pytest

from compose.netns import Lab, LabError


@functools.cache
def lab_unavailable() -> str | None:
    """Why a lab cannot run here, or None (asked once per session: root, the tools, a namespace for real)."""
    if os.geteuid() != 0:
        return "network tests need root (network namespaces, nftables)"
    for binary, package in (("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping")):
        if shutil.which(binary) is None:
            return f"network tests need `{binary}` (Debian package {package})"
    probe = Lab(prefix="cotprobe")
    try:
        probe.add_host("probe").nft("table inet probe {}\n")
    except LabError as exc:
        return f"cannot create a network namespace with nftables here: {exc}"
    finally:
        probe.close()
        probe.remove_workdir()
    return None


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab() as the_lab:
        yield the_lab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"lab logs kept in {the_lab.workdir}")
    else:
        the_lab.remove_workdir()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Remember each phase's report on the item, so the fixture knows whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
