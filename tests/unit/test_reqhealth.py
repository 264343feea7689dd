"""The live-traffic failure counter: consecutive child-fault endings within a window."""

from __future__ import annotations

import pytest

from llamarouter.core.reqhealth import RequestHealth, status_fault


@pytest.mark.parametrize(
    ("status", "counts"),
    [(200, False), (400, False), (404, False), (499, False), (500, True), (501, False),
     (502, True), (503, False), (504, True)],
)
def test_which_statuses_are_the_childs_fault(status: int, counts: bool) -> None:
    assert (status_fault(status) is not None) is counts


def test_threshold_in_a_row_trips_once_and_starts_again() -> None:
    h = RequestHealth(3, 60.0)
    assert h.note(0.0, "HTTP 500") is None
    assert h.note(1.0, "HTTP 500") is None
    cause = h.note(2.0, "reset")
    assert cause is not None and "3 requests in a row" in cause and "last: reset" in cause
    assert h.streak == 0
    assert h.note(3.0, "HTTP 500") is None


def test_an_answer_starts_the_count_again() -> None:
    h = RequestHealth(2, 60.0)
    assert h.note(0.0, "HTTP 500") is None
    assert h.note(0.5, None) is None
    assert h.note(1.0, "HTTP 500") is None
    assert h.note(1.5, "HTTP 500") is not None


def test_failures_older_than_the_window_do_not_count() -> None:
    h = RequestHealth(2, 10.0)
    assert h.note(0.0, "HTTP 500") is None
    assert h.note(10.5, "HTTP 500") is None  # the first is out of the window
    assert h.streak == 1
    assert h.note(11.0, "HTTP 500") is not None


def test_zero_turns_it_off() -> None:
    h = RequestHealth(0, 60.0)
    assert all(h.note(float(i), "HTTP 500") is None for i in range(100))
