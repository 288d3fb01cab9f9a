"""pytest plugin (entry point `moe_fusion`, loaded automatically once moe-fusion is installed).

Fixture::

    def test_my_fused_model(moe_equivalence):
        moe_equivalence("exports/qwen3", "exports/qwen3-fused")            # fails with the one-line reason

Marker (the test body runs after the check passed and may use the report)::

    @pytest.mark.moe_equivalent("exports/qwen3", "exports/qwen3-fused", steps=1)
    def test_fused_model_ships(moe_report):
        assert moe_report.top1 == 1.0

Options: `--moe-tokens 1,16,64`, `--moe-steps N`, `--moe-device CPU`, `--moe-mode whole|layers` set the
defaults of both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # openvino is imported only when a test uses the fixture or marker
    from moe_fusion.checking import CheckReport


def _assert_equivalent(*args: Any, **kwargs: Any) -> CheckReport:
    from moe_fusion.testing import assert_equivalent

    return assert_equivalent(*args, **kwargs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-fusion", "moe-fusion equivalence checks")
    group.addoption("--moe-tokens", default=None, help="token counts for moe equivalence checks, e.g. 1,16,64")
    group.addoption("--moe-steps", type=int, default=None, help="decode steps for moe equivalence checks")
    group.addoption("--moe-device", default=None, help="device for moe equivalence checks (default CPU)")
    group.addoption("--moe-mode", default=None, choices=("whole", "layers"),
                    help="mode of moe equivalence checks (default whole; layers: one MoE layer at a time)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "moe_equivalent(original, fused, **kwargs): assert moe_fusion.check(original, fused, **kwargs) is "
        "equivalent before the test runs; the report is the `moe_report` fixture",
    )


def _defaults(config: pytest.Config) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if config.getoption("--moe-tokens"):
        found["tokens"] = [int(t) for t in config.getoption("--moe-tokens").split(",")]
    if config.getoption("--moe-steps") is not None:
        found["steps"] = config.getoption("--moe-steps")
    if config.getoption("--moe-device"):
        found["device"] = config.getoption("--moe-device")
    if config.getoption("--moe-mode"):
        found["mode"] = config.getoption("--moe-mode")
    return found


FAILURE = pytest.StashKey[str]()


@pytest.fixture
def moe_equivalence(request: pytest.FixtureRequest) -> Callable[..., CheckReport]:
    """`moe_equivalence(original, fused, **kwargs)` -> CheckReport; fails the test if not equivalent."""
    defaults = _defaults(request.config)

    def run(original: str | Path, fused: str | Path, **kwargs: Any) -> CheckReport:
        __tracebackhide__ = True
        try:
            return _assert_equivalent(original, fused, **{**defaults, **kwargs})
        except AssertionError as error:
            message = str(error)
        pytest.fail(message, pytrace=False)

    return run


@pytest.fixture
def moe_report(request: pytest.FixtureRequest) -> CheckReport | None:
    """The report of the test's `moe_equivalent` marker (None without the marker). A pair that is not
    equivalent fails the test itself (not its setup) with the one-line reason."""
    marker = request.node.get_closest_marker("moe_equivalent")
    if marker is None:
        return None
    if len(marker.args) != 2:
        pytest.fail("@pytest.mark.moe_equivalent needs two arguments: original, fused", pytrace=False)
    try:
        return _assert_equivalent(*marker.args, **{**_defaults(request.config), **marker.kwargs})
    except AssertionError as error:
        request.node.stash[FAILURE] = str(error)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    message = item.stash.get(FAILURE, None)
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # a marked test runs its check even when it does not ask for the report
        if item.get_closest_marker("moe_equivalent") and "moe_report" not in getattr(item, "fixturenames", ()):
            item.fixturenames.append("moe_report")
