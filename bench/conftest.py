"""pytest glue for the bench: one table of ratios per session, printed and written to bench/results/."""

from __future__ import annotations

from bench import report


def pytest_sessionstart(session) -> None:
    report.fill_meta()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    paths = report.write()
    if not paths:
        return
    terminalreporter.section("productd bench: ratios in this session")
    terminalreporter.write(report.markdown())
    for path in paths:
        terminalreporter.write_line(f"written to {path} and {path.with_suffix('.json')}")
