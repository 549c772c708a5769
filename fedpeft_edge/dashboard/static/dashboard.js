// fedpeft-edge dashboard: one panel per run; a snapshot, then server-sent deltas merged in place.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const Q = TOKEN ? "?token=" + encodeURIComponent(TOKEN) : "";
const views = [];

const fmt = {
  mb: (b) => (b == null ? "–" : (b / 1e6).toFixed(b >= 1e8 ? 0 : b >= 1e6 ? 2 : 3)),
  pct: (x) => (x == null ? "–" : (100 * x).toFixed(1) + "%"),
  num: (x, d = 1) => (x == null ? "–" : Number(x).toFixed(d)),
  ago: (t, now) => {
    if (t == null) return "–";
    const s = Math.max(0, now / 1000 - t);
    return s < 60 ? s.toFixed(0) + " s ago" : s < 3600 ? (s / 60).toFixed(0) + " min ago" : (s / 3600).toFixed(1) + " h ago";
  },
  secs: (s) => (s < 0 ? "0 s" : s < 100 ? s.toFixed(0) + " s" : Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s"),
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

class RunView {
  constructor(root, run) {
    this.index = run.index;
    this.node = document.getElementById("run-template").content.firstElementChild.cloneNode(true);
    this.node.dataset.runIndex = run.index;
    this.node.querySelector(".run-id").textContent = run.run_id;
    root.appendChild(this.node);
    this.$ = (sel) => this.node.querySelector(sel);
    this.state = null;
    this.offsetMs = 0; // server clock minus ours
    this.charts = {};
    this.connect();
  }

  connect() {
    this.es = new EventSource("api/events/" + this.index + Q);
    this.es.addEventListener("snapshot", (e) => {
      this.state = JSON.parse(e.data);
      this.offsetMs = this.state.server_time * 1000 - Date.now();
      setConn("live");
      this.render(true);
    });
    this.es.addEventListener("delta", (e) => {
      const d = JSON.parse(e.data);
      if (!this.state || d.seq <= this.state.seq) return; // already in the snapshot
      this.merge(d);
      this.render("round" in d);
    });
    this.es.onerror = () => {
      if (this.state && this.state.run.finished) {
        this.es.close(); // the run is over: nothing more will come
        setConn("finished");
      } else {
        setConn("lost"); // EventSource reconnects by itself and gets a fresh snapshot
      }
    };
  }

  merge(d) {
    const s = this.state;
    if (d.run) Object.assign(s.run, d.run);
    if (d.devices) Object.assign(s.devices, d.devices);
    if (d.round) s.rounds.push(d.round);
    if ("current" in d) s.current = d.current;
    if (d.dropped_messages) s.dropped_messages = d.dropped_messages;
    s.seq = d.seq;
  }

  now() { return Date.now() + this.offsetMs; }

  render(chartsToo) {
    const s = this.state;
    const run = s.run;
    const meta = [run.model, run.method, run.dataset, run.encoding].filter(Boolean).join(" · ");
    this.$(".run-meta").textContent = meta + (run.resumed_after != null ? " · resumed after round " + run.resumed_after : "");
    const status = this.$(".run-status");
    const live = !run.finished && run.started != null;
    status.textContent = run.finished ? "finished" : live ? "live" : "waiting for devices";
    status.className = "badge run-status " + (run.finished ? "finished" : live ? "live" : "");
    if (views.every((v) => v.state && v.state.run.finished)) setConn("finished");
    this.renderKpis();
    this.renderDevices();
    this.renderCurrent();
    this.renderDrops();
    if (chartsToo) {
      this.renderCharts();
      renderCompare();
    }
  }

  renderKpis() {
    const s = this.state;
    const done = s.rounds.filter((r) => r.status === "aggregated");
    this.$(".round-counter").textContent = done.length ? done[done.length - 1].round : 0;
    this.$(".round-total").textContent = s.run.comm_round ? " / " + s.run.comm_round : "";
    const withAcc = done.filter((r) => r.top1 != null);
    this.$(".acc").textContent = withAcc.length ? fmt.pct(withAcc[withAcc.length - 1].top1) : "–";
    const withPpl = done.filter((r) => r.perplexity != null); // a causal LM: top-1 is next-token accuracy
    this.$(".ppl-kpi").hidden = !withPpl.length;
    if (withPpl.length) this.$(".ppl").textContent = withPpl[withPpl.length - 1].perplexity.toFixed(2);
    const last = s.rounds[s.rounds.length - 1];
    this.$(".wire").textContent = fmt.mb(last ? last.cum_bytes : 0) + " MB";
    const devs = Object.values(s.devices);
    this.$(".online").textContent = devs.filter((d) => d.online && d.accepted).length + " / " + devs.length;
    this.$(".drops").textContent = s.rounds.reduce((n, r) => n + Object.values(r.dropped || {}).reduce((a, b) => a + b, 0), 0);
  }

  renderDevices() {
    const tbody = this.$("table.devices tbody");
    const now = this.now();
    const ids = Object.keys(this.state.devices).sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    tbody.replaceChildren(...ids.map((id) => {
      const d = this.state.devices[id];
      const tr = el("tr");
      tr.dataset.deviceId = id;
      const name = el("td");
      name.append(el("span", "dot " + (d.online ? "on" : d.online === false ? "off" : "")), id);
      const state = el("td");
      const label = d.accepted === false ? "refused" : d.online ? "online" : d.online === false ? "offline" : "–";
      state.append(el("span", "pill " + (d.accepted === false ? "refused" : d.online ? "accepted" : "dropped"), label));
      if (d.last_status === "BUDGET_EXHAUSTED") state.append(el("span", "pill dropped", "budget spent"));
      const last = d.last_round == null ? "–" : "#" + d.last_round + " " + (d.last_status || "");
      const drops = Object.entries(d.drops || {}).map(([k, v]) => k + " ×" + v).join(", ") || "–";
      const profile = el("td", "muted", (d.profile || "–") + (d.rank == null ? "" : " · LoRA rank " + d.rank));
      if (d.rank_reason) profile.title = d.rank_reason;
      tr.append(name, state, el("td", "", fmt.ago(d.last_seen, now)), profile,
        el("td", "", last), el("td", "num", fmt.num(d.cpu_s, d.cpu_s != null && d.cpu_s < 10 ? 2 : 1)), el("td", "num", fmt.num(d.cpu_util_pct, 0)),
        el("td", "num", fmt.num(d.rss_peak_mb, 0)), el("td", "num", d.energy_j == null ? "n/a" : fmt.num(d.energy_j, 1)),
        el("td", "num", d.epsilon == null ? "–" : fmt.num(d.epsilon, 2)),
        el("td", "num", fmt.mb(d.bytes_down) + " / " + fmt.mb(d.bytes_up)), el("td", "", drops));
      if (d.error) tr.title = d.error;
      return tr;
    }));
  }

  renderCurrent() {
    const body = this.$(".current-body");
    const c = this.state.current;
    if (!c) {
      body.replaceChildren(el("div", "muted", this.state.run.finished ? "run finished" : "no round open"));
      return;
    }
    const answered = c.answered || {};
    const line = el("div", "current-line");
    const title = el("span");
    title.append("Round ", el("b", "", String(c.round)));
    const how = [c.attempt ? "retry " + c.attempt : "", c.mode || ""].filter(Boolean).join(" · ");
    line.append(title, el("span", "muted", how),
      el("span", "muted", Object.keys(answered).length + " of " + c.selected.length + " answered"));
    const cd = el("span", "countdown");
    line.append(cd);
    const bar = el("div", "bar");
    const fill = el("div");
    bar.append(fill);
    const chips = el("div", "chips");
    for (const id of c.selected) {
      const st = answered[id];
      chips.append(el("span", "chip " + (st || ""), id + " · " + (st || "training…")));
    }
    body.replaceChildren(line, bar, chips);
    this.countdown = { cd, bar, fill, c };
    this.tick();
  }

  tick() {
    if (!this.state) return;
    this.renderDevicesSeen();
    const k = this.countdown;
    if (!k || this.state.current !== k.c || k.c.deadline == null) return;
    const now = this.now() / 1000;
    const left = k.c.deadline - now;
    const total = Math.max(1e-3, k.c.deadline - k.c.opened_at);
    k.cd.textContent = "deadline in " + fmt.secs(left);
    k.fill.style.width = Math.max(0, Math.min(100, (100 * left) / total)).toFixed(1) + "%";
    k.bar.classList.toggle("late", left < 0.2 * total);
  }

  renderDevicesSeen() {
    const now = this.now();
    for (const tr of this.node.querySelectorAll("table.devices tbody tr")) {
      const d = this.state.devices[tr.dataset.deviceId];
      if (d) tr.children[2].textContent = fmt.ago(d.last_seen, now);
    }
  }

  renderDrops() {
    const box = this.$(".drop-reasons");
    const byReason = {};
    for (const r of this.state.rounds) for (const [k, v] of Object.entries(r.dropped || {})) byReason[k] = (byReason[k] || 0) + v;
    const items = Object.entries(byReason).map(([k, v]) => el("span", "reason", k + ": " + v));
    for (const [k, v] of Object.entries(this.state.dropped_messages || {})) items.push(el("span", "reason msg", "message " + k + ": " + v));
    box.replaceChildren(...(items.length ? items : [el("span", "muted", "none")]));
  }

  renderCharts() {
    const rows = this.state.rounds;
    const ok = rows.filter((r) => r.status === "aggregated");
    const rnd = ok.map((r) => r.round);
    const acc = ok.map((r) => (r.top1 == null ? null : 100 * r.top1));
    const mb = ok.map((r) => (r.cum_bytes || 0) / 1e6);
    const line = (label, stroke) => ({ label, stroke, width: 2, points: { size: 6, fill: stroke } });
    this.chart("acc-round", [rnd, acc], [line("top-1 %", "#3461d1")], { x: "round", y: "%", rounds: true, pct: true });
    this.chart("acc-mb", [mb, acc], [line("top-1 %", "#7a4fd1")], { x: "MB on the wire (cumulative)", y: "%", pct: true });
    const ppl = ok.map((r) => (r.perplexity == null ? null : r.perplexity));
    const hasPpl = ppl.some((v) => v != null);
    this.$(".ppl-card").hidden = !hasPpl;
    if (hasPpl) this.chart("ppl-round", [rnd, ppl], [line("perplexity", "#c2410c")], { x: "round", y: "perplexity", rounds: true, zero: true });
    const x = rows.map((r) => r.round + 0.1 * Math.min(9, r.attempt || 0)); // a retried round sits just after
    const bars = (align) => (uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.32, 36], align }) : undefined);
    this.chart("bytes", [x, rows.map((r) => (r.bytes_down || 0) / 1e6), rows.map((r) => (r.bytes_up || 0) / 1e6)],
      [{ label: "down MB", stroke: "#3461d1", fill: "rgba(52,97,209,.7)", paths: bars(-1), points: { show: false } },
       { label: "up MB", stroke: "#d9822b", fill: "rgba(217,130,43,.7)", paths: bars(1), points: { show: false } }],
      { x: "round", y: "MB", rounds: true, pad: true, zero: true });
    this.chart("rtime", [x, rows.map((r) => r.round_s)], [line("round s", "#1f9d55")],
      { x: "round", y: "s", rounds: true, zero: true });
  }

  chart(name, data, series, o) {
    const box = this.$(".chart." + name);
    if (!data[0].length) { // nothing to draw yet: say so rather than show empty axes
      if (this.charts[name]) this.charts[name].u.destroy();
      delete this.charts[name];
      box.replaceChildren(el("div", "chart-empty", "waiting for the first round…"));
      return;
    }
    if (!this.charts[name]) box.replaceChildren();
    const width = Math.max(260, box.clientWidth || 400);
    const existing = this.charts[name];
    if (existing && existing.width === width && existing.n === series.length) {
      existing.u.setData(data);
      return;
    }
    if (existing) existing.u.destroy();
    const xs = { time: false };
    if (o.pad) xs.range = (u, lo, hi) => [(lo == null ? 1 : lo) - 0.6, (hi == null ? 1 : hi) + 0.6];
    const ys = {};
    if (o.zero) ys.range = (u, lo, hi) => [0, hi > 0 ? hi * 1.15 : 1];
    if (o.pct) ys.range = () => [0, 100]; // accuracy: always the whole 0-100% scale
    const grid = { stroke: "#eef1f6" };
    const opts = {
      width, height: 210, legend: { live: false },
      scales: { x: xs, y: ys },
      axes: [{ label: o.x, grid, ...(o.rounds ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] } : {}) },
             { label: o.y, grid, size: 56 }],
      series: [{ label: o.x }, ...series],
      cursor: { drag: { x: false, y: false } },
    };
    this.charts[name] = { u: new uPlot(opts, data, box), width, n: series.length };
  }
}

const PALETTE = ["#3461d1", "#d9822b", "#1f9d55", "#7a4fd1", "#d64545", "#0f8fa3", "#8a6a00", "#c2418f"];

// Several runs: their accuracy on shared axes (x values merged; a run has null where it has no point).
const compare = { charts: {} };
function renderCompare() {
  if (views.length < 2 || views.some((v) => !v.state)) return;
  document.getElementById("compare").hidden = false;
  for (const [name, xOf] of [["cmp-mb", (r) => (r.cum_bytes || 0) / 1e6], ["cmp-round", (r) => r.round]]) {
    const per = views.map((v) => new Map(v.state.rounds.filter((r) => r.status === "aggregated" && r.top1 != null)
      .map((r) => [xOf(r), 100 * r.top1])));
    const xs = [...new Set(per.flatMap((m) => [...m.keys()]))].sort((a, b) => a - b);
    const data = [xs, ...per.map((m) => xs.map((x) => (m.has(x) ? m.get(x) : null)))];
    const box = document.querySelector(".chart." + name);
    if (compare.charts[name]) compare.charts[name].destroy();
    box.replaceChildren();
    if (!xs.length) continue;
    compare.charts[name] = new uPlot({
      width: Math.max(260, box.clientWidth || 400), height: 230, legend: { live: false },
      scales: { x: { time: false }, y: { range: () => [0, 100] } },
      axes: [{ label: name === "cmp-mb" ? "MB on the wire (cumulative)" : "round", grid: { stroke: "#eef1f6" },
               ...(name === "cmp-round" ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] } : {}) },
             { label: "top-1 %", grid: { stroke: "#eef1f6" }, size: 56 }],
      series: [{}, ...views.map((v, i) => ({ label: v.state.run.run_id + (v.state.run.method ? " (" + v.state.run.method + ")" : ""),
        stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
        points: { size: 6, fill: PALETTE[i % PALETTE.length] } }))],
      cursor: { drag: { x: false, y: false } },
    }, data, box);
  }
}

function setConn(state) {
  const c = document.getElementById("conn");
  c.textContent = state === "live" ? "live" : state === "finished" ? "run finished" : state === "lost" ? "reconnecting…" : state;
  c.className = "conn " + (state === "live" ? "live" : state === "lost" ? "lost" : "");
}

async function main() {
  const runs = await (await fetch("api/runs" + Q)).json();
  const root = document.getElementById("runs");
  root.classList.toggle("multi", runs.length > 1);
  for (const run of runs) views.push(new RunView(root, run));
  setInterval(() => views.forEach((v) => v.tick()), 1000);
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      views.forEach((v) => v.state && v.renderCharts());
      renderCompare();
    }, 200);
  });
}

main().catch((err) => { setConn("error: " + err); });
