"""A library call's summary record is dropped only from the console of the command that prints it itself."""

from __future__ import annotations

import io
import logging

import pytest

from exem.quiet import drop_summaries_of, summary_of


def _log_three(log: logging.Logger) -> None:
    log.info("the command's own summary", extra=summary_of("exem-test-a"))
    log.info("a step's summary", extra=summary_of("exem-test-b"))
    log.info("progress")


def test_a_command_drops_only_its_own_summary_record(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("exem.tests.quiet")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger=log.name):
            _log_three(log)  # a notebook: nothing dropped
            assert stream.getvalue().splitlines() == [
                "the command's own summary",
                "a step's summary",
                "progress",
            ]
            stream.truncate(0)
            stream.seek(0)
            drop_summaries_of("exem-test-a")  # what exem-test-a's CLI does to its console
            drop_summaries_of("exem-test-a")  # again (a Hydra multirun: one run per job): still one filter
            assert len(handler.filters) == 1
            _log_three(log)
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["a step's summary", "progress"]


def test_a_command_hides_lightning_tips_once_and_http_request_lines() -> None:
    from exem.cli import _tidy_logging
    from exem.quiet import LIGHTNING_ANNOUNCER

    announcer = logging.getLogger(LIGHTNING_ANNOUNCER)
    before = list(announcer.filters)
    httpx_level = logging.getLogger("httpx").level
    try:
        _tidy_logging("exem-test-a")
        _tidy_logging("exem-test-a")  # a multirun's second job
        added = [f for f in announcer.filters if f not in before]
        assert len(added) <= 1 and len(announcer.filters) == len(before) + len(added)

        def shown(message: str) -> bool:
            return bool(
                announcer.filter(announcer.makeRecord(announcer.name, logging.INFO, "", 0, message, (), None))
            )

        assert not shown("💡 Tip: For seamless cloud uploads, try installing litmodels")
        assert shown("GPU available: False, used: False")
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING  # no line per HTTP request
    finally:
        announcer.filters[:] = before
        logging.getLogger("httpx").setLevel(httpx_level)
