"""The operator's log keeps what a person reads (reconciles, failures), not per-event noise."""

import logging

from berth.operator.reconciler import QuietWatchers


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)


def test_status_watcher_successes_are_dropped() -> None:
    quiet = QuietWatchers()
    for name in ("pod_changed", "deployment_changed", "service_changed"):
        assert not quiet.filter(record(f"Handler '{name}' succeeded."))


def test_reconciles_and_watcher_failures_are_kept() -> None:
    quiet = QuietWatchers()
    assert quiet.filter(record("Handler 'reconcile' succeeded."))
    assert quiet.filter(record("Creation is processed: 1 succeeded; 0 failed."))
    assert quiet.filter(record("Handler 'pod_changed' succeeded.", logging.WARNING))
    assert quiet.filter(record("Handler 'pod_changed' failed with an exception.", logging.ERROR))
