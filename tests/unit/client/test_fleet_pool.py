"""The fleet's training pool gives freed heap back after every window, whether the window returned or raised."""

from __future__ import annotations

import pytest

from fedpeft_edge.client import fleet


def test_training_pool_trims_after_each_window(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    monkeypatch.setattr(fleet, "_MALLOC_TRIM", trim)
    with fleet.TrainingPool(max_workers=1) as pool:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result() == 5
        failed = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result()
    assert calls == [0, 0]


def test_malloc_trim_is_found_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert fleet._MALLOC_TRIM is not None
    assert fleet._MALLOC_TRIM(0) in (0, 1)
