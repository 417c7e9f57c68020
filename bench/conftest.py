"""pytest glue for the bench: one table of ratios per session, printed and written to bench/results/."""

from __future__ import annotations

from bench import report


def pytest_sessionstart(session) -> None:
    report.fill_meta()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    path = report.write()
    if path is None:
        return
    terminalreporter.section("productd bench: ratios in this session")
    terminalreporter.write(report.markdown())
    terminalreporter.write_line(f"written to {path} and {path.with_suffix('.json')}")
