"""A runtime that cannot start leaves why in the container's termination message."""

from pathlib import Path

from berth import wire
from berth.runtime.server.lifecycle import report_termination


def test_the_reason_goes_into_the_file_the_kubelet_made_and_is_bounded(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.touch()
    report_termination("budget too small " + "x" * 10_000, log)
    text = log.read_text()
    assert text.startswith("budget too small") and len(text) == wire.TERMINATION_MESSAGE_BYTES


def test_outside_a_pod_nothing_is_written(tmp_path: Path) -> None:
    report_termination("why", tmp_path / "termination-log")
    assert not (tmp_path / "termination-log").exists()
