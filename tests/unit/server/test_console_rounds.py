"""The server's console prints one line per join and per round, as the demo does."""

from __future__ import annotations

import pytest

from server_app.main import ConsoleRounds


def test_the_server_console_prints_a_line_per_round_and_join(capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleRounds(rounds=3)
    sink.write({"kind": "join", "device_id": "dev0", "accepted": True})
    sink.write({"kind": "round", "round": 2, "status": "aggregated", "accepted": 2, "devices_online": 2,
                "bytes_down": 400_000, "bytes_up": 410_000, "round_s": 3.25, "cum_bytes": 1_620_000,
                "eval": {"top1": 0.713}, "dropped": {}})
    sink.write({"kind": "round", "round": 3, "status": "failed", "attempt": 0, "accepted": 0, "devices_online": 1,
                "bytes_down": 1, "bytes_up": 0, "round_s": 1.0, "cum_bytes": 2, "dropped": {"went_offline": 1}})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fedpeft-server: device dev0 joined"
    assert out[1] == ("fedpeft-server: round 2/3: acc 71.3%, 2 updates, 2 online, 0.400 MB down / 0.410 MB up, "
                      "3.2s, total 1.620 MB")
    assert "round 3/3 FAILED (attempt 0)" in out[2] and "dropped {'went_offline': 1}" in out[2]
