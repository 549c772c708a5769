"""The demo's secrets stay out of its run directory (issue 25): the keystore is elsewhere, node configs in the
run directory name its files and hold no password, the saved configs still connect."""

from __future__ import annotations

from pathlib import Path

from fedpeft_edge.cli.demo import REPO_CONFIGS, _node_config, _provision
from fedpeft_edge.config import load_config, read_password


def test_a_demo_run_directory_holds_no_secret(tmp_path: Path) -> None:
    run_dir, keystore = tmp_path / "runs" / "demo-x", tmp_path / "keystore"
    run_dir.mkdir(parents=True)
    prov = _provision(keystore, ["device-0", "device-1"], "demo-x", "fedpeft")
    assert not prov.root.is_relative_to(run_dir)
    configs = {n: _node_config(str(REPO_CONFIGS / "quickstart.yaml"), {}, run_dir, n, prov)
               for n in ("0", "device-0", "device-1")}
    passwords = [prov.password(n) for n in ("0", "device-0", "device-1")]
    for path in run_dir.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(p in text for p in passwords), path
            assert "PRIVATE KEY" not in text, path
    cfg = load_config(configs["device-0"])
    assert cfg.comm_args.require_signatures and read_password(cfg.comm_args) == prov.password("device-0")
    assert Path(cfg.comm_args.signing_key_file or "").is_relative_to(keystore)
