"""Opt-in pytest plugin: how close every tolerance check of the suite comes to failing on this machine.

    PYTHONPATH=tests python -m pytest -p tolerance_audit [pytest args]

Wraps ``torch.testing.assert_close`` and ``pytest.approx`` and records, per call site, the largest ratio of the
measured difference to the allowed one (1.0 = at the edge; above 1.0 it failed). The sites whose ratio exceeds
``RESTORELCC_AUDIT_MIN_RATIO`` (default 0.5: within 2x of the tolerance) are printed at the end and written to
``RESTORELCC_AUDIT_OUTPUT`` (default ``tolerance_audit.json``). A tolerance that close to what a check measures can
fail on another CPU (another BLAS kernel, another summation order); derive it from the arithmetic instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

_TESTS_DIR = str(Path(__file__).resolve().parent)
# torch.testing.assert_close's defaults (rtol, atol) per dtype.
_TORCH_DEFAULTS = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
_worst: dict[str, float] = {}
# Checks that two values differ (``!= approx``) are at risk from the other side: a ratio that comes down to 1.
_closest_different: dict[str, float] = {}


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TESTS_DIR) and not filename.endswith("tolerance_audit.py"):
            return f"{Path(filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _record(site: str, ratio: float, different: bool = False) -> None:
    if ratio != ratio:  # NaN: nothing to measure
        return
    if different:
        _closest_different[site] = min(_closest_different.get(site, float("inf")), ratio)
    else:
        _worst[site] = max(_worst.get(site, 0.0), ratio)


def _tensor_ratio(actual, expected, rtol, atol) -> float | None:
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if not (actual.is_floating_point() and expected.is_floating_point()) or actual.shape != expected.shape:
        return None
    if rtol is None or atol is None:
        default_rtol, default_atol = _TORCH_DEFAULTS.get(actual.dtype, (0.0, 0.0))
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
    difference = (actual.double() - expected.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    if actual.numel() == 0:
        return None
    exact = difference == 0
    ratios = torch.where(exact, torch.zeros_like(difference), difference / allowed.clamp_min(1e-300))
    return float(ratios.max())


def _wrap_assert_close(original):
    def assert_close(actual, expected, *args, **kwargs):
        site = _call_site()
        try:
            if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
                ratio = _tensor_ratio(actual.detach().cpu(), expected.detach().cpu(), kwargs.get("rtol"), kwargs.get("atol"))
                if ratio is not None:
                    _record(site, ratio)
        except Exception:  # the audit must never change a test's outcome
            pass
        return original(actual, expected, *args, **kwargs)

    return assert_close


def _wrap_approx(original):
    def approx(expected, *args, **kwargs):
        approximation = original(expected, *args, **kwargs)
        site = _call_site()
        is_scalar = type(approximation).__name__ == "ApproxScalar"
        comparisons = getattr(approximation, "_yield_comparisons", None)

        class Audited(type(approximation)):
            def __eq__(self, actual, different=False):
                try:
                    pairs = [(actual, expected)] if is_scalar else list(comparisons(actual))
                    for got, wanted in pairs:
                        tolerance = original(wanted, *args, **kwargs).tolerance
                        difference = abs(float(got) - float(wanted))
                        _record(site, 0.0 if difference == 0 else difference / tolerance, different)
                except Exception:
                    pass
                return super().__eq__(actual)

            def __ne__(self, actual):
                return not self.__eq__(actual, different=True)

            __hash__ = None

        approximation.__class__ = Audited
        return approximation

    return approx


def pytest_configure(config) -> None:
    torch.testing.assert_close = _wrap_assert_close(torch.testing.assert_close)
    pytest.approx = _wrap_approx(pytest.approx)


def pytest_terminal_summary(terminalreporter) -> None:
    threshold = float(os.environ.get("RESTORELCC_AUDIT_MIN_RATIO", "0.5"))
    close = {site: ratio for site, ratio in sorted(_worst.items(), key=lambda item: -item[1]) if ratio > threshold}
    terminalreporter.write_line(
        f"tolerance audit: {len(_worst)} call sites measured, {len(close)} above {threshold} of their tolerance"
    )
    for site, ratio in close.items():
        terminalreporter.write_line(f"  {ratio:8.3f}  {site}")
    near = {site: ratio for site, ratio in sorted(_closest_different.items(), key=lambda item: item[1]) if ratio < 2}
    terminalreporter.write_line(
        f"tolerance audit: {len(_closest_different)} '!= approx' sites measured, {len(near)} within 2x of equal"
    )
    for site, ratio in near.items():
        terminalreporter.write_line(f"  {ratio:8.3f}  {site}")
    output = os.environ.get("RESTORELCC_AUDIT_OUTPUT", "tolerance_audit.json")
    report = {
        "equal": dict(sorted(_worst.items(), key=lambda item: -item[1])),
        "different": dict(sorted(_closest_different.items(), key=lambda item: item[1])),
    }
    Path(output).write_text(json.dumps(report, indent=1) + "\n")
