// llamarouter dashboard: a live model table, a 15-minute timeline, logs and a small chat.
// No build step, no libraries: the charts are plain SVG.
// Every API call goes through api(), which adds `Authorization: Bearer KEY` when a key is
// saved. /models/sse is read with fetch() rather than EventSource, which cannot send headers.
"use strict";

(() => {
  const KEY_STORE = "llamarouter.apiKey";
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ API access
  let apiKey = "";
  try { apiKey = localStorage.getItem(KEY_STORE) || ""; } catch { /* storage disabled */ }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, opts = {}) {
    const headers = new Headers(opts.headers || {});
    if (apiKey) headers.set("Authorization", "Bearer " + apiKey);
    const resp = await fetch(path, { cache: "no-store", ...opts, headers });
    if (!resp.ok) {
      let message = resp.statusText || "HTTP " + resp.status;
      try {
        const body = await resp.json();
        if (body && body.error && body.error.message) message = body.error.message;
      } catch { /* not JSON */ }
      throw new ApiError(resp.status, message);
    }
    return resp;
  }

  function postJSON(path, body, signal) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    });
  }

  // Reads a text/event-stream body and calls onData with each event's data; onData may
  // return false to stop reading. Only `data:` lines matter here.
  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          let line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {
            if (data.length) {
              const text = data.join("\n");
              data = [];
              if (onData(text) === false) { reader.cancel().catch(() => {}); return; }
            }
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          }
        }
      }
      if (data.length) onData(data.join("\n"));
    } finally {
      reader.releaseLock();
    }
  }

  // ------------------------------------------------------------------ notices
  function showNotice(text) {
    const el = $("notice");
    el.textContent = text;
    el.hidden = false;
  }

  function clearNotice() {
    $("notice").hidden = true;
    $("notice").textContent = "";
  }

  function announce(text) {
    $("announce").textContent = text;
  }

  function errorText(err, what) {
    if (err instanceof ApiError && err.status === 401) {
      return apiKey
        ? `${what}: the saved API key was rejected (${err.message}). Enter the right key above.`
        : `${what}: the router needs an API key (${err.message}). Enter it above.`;
    }
    return `${what}: ${err.message || err}`;
  }

  function report(err, what) {
    showNotice(errorText(err, what));
  }

  // ------------------------------------------------------------------ formatting
  function fmtBytes(n) {
    if (typeof n !== "number" || !isFinite(n) || n < 0) return null;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  // Memory of a model from its /models item and its /memory entry: the measurement (what
  // the child reported for its buffers), the estimate (from the GGUF), and the RSS of the
  // child process (which also counts the mapped model file).
  function memoryOf(item) {
    const mem = memInfo.models[item.id] || {};
    const measured = item.measured_bytes ?? mem.measured_bytes;
    const estimated = item.estimated_bytes ?? mem.estimated_bytes;
    const rss = statusOf(item) === "unloaded" ? undefined : mem.rss_bytes;
    return { measured, estimated, rss };
  }

  function fmtMemory(m) {
    const parts = [];
    if (fmtBytes(m.measured)) parts.push(fmtBytes(m.measured));
    if (fmtBytes(m.estimated)) parts.push(`est. ${fmtBytes(m.estimated)}`);
    if (fmtBytes(m.rss)) parts.push(`RSS ${fmtBytes(m.rss)}`);
    return parts.length ? parts.join(" · ") : "–";
  }

  // The bar's scale: the memory budget when there is one, else the largest model shown.
  function memoryScale() {
    if (memInfo.budget) return memInfo.budget;
    let top = 0;
    for (const item of models.values()) {
      const m = memoryOf(item);
      top = Math.max(top, m.measured || 0, m.estimated || 0, m.rss || 0);
    }
    return top;
  }

  function fmtTime(secs) {
    if (!secs) return ["–", ""];
    const d = new Date(secs * 1000);
    return [d.toLocaleTimeString(), d.toLocaleString()];
  }

  // ------------------------------------------------------------------ markdown
  // A tiny renderer: escape HTML first, then fenced code blocks, inline code, bold, italic
  // and line breaks. The input is escaped before any tag is added, so model output can
  // never inject markup.
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function renderInline(s) {
    return s.split(/(`[^`\n]+`)/).map((part, i) => {
      if (i % 2) return "<code>" + part.slice(1, -1) + "</code>";
      return part
        .replace(/\*\*(?=\S)([^\n]*?\S)\*\*/g, "<strong>$1</strong>")
        .replace(/__(?=\S)([^\n]*?\S)__/g, "<strong>$1</strong>")
        .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
        .replace(/(^|[^_\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>")
        .replace(/\n/g, "<br>");
    }).join("");
  }

  function renderMarkdown(src) {
    const text = escapeHtml(src);
    const out = [];
    // An unclosed fence (still streaming) runs to the end.
    const fence = /(^|\n)```([\w+.#-]*)[^\n]*(?:\n|$)([\s\S]*?)(?:\n```[^\n]*(?=\n|$)|$)/g;
    let last = 0;
    let m;
    // After a block, the newline that ended its closing fence is not a line break.
    const inline = (s) => renderInline(last ? s.replace(/^\n/, "") : s);
    while ((m = fence.exec(text)) !== null) {
      out.push(inline(text.slice(last, m.index)));
      const lang = m[2] ? ` class="language-${m[2]}"` : "";
      out.push(`<pre><code${lang}>${m[3]}</code></pre>`);
      last = fence.lastIndex;
    }
    out.push(inline(text.slice(last)));
    return out.join("");
  }

  // ------------------------------------------------------------------ model table
  const models = new Map(); // id -> latest /models item
  let memInfo = { budget: null, models: {} }; // latest GET /memory
  const rows = new Map(); // id -> {tr, cells}

  function statusOf(item) {
    return (item && item.status && item.status.value) || "unloaded";
  }

  function statusDetail(item) {
    const s = item.status || {};
    if (s.value === "downloading" && s.progress) {
      // POST /models: bytes so far, of all the files under way.
      const p = s.progress;
      return p.total ? `${fmtBytes(p.done)} of ${fmtBytes(p.total)}` : "starting";
    }
    if (s.failed) return `failed, exit ${s.exit_code}` + (s.error ? `: ${s.error}` : "");
    if (s.error) return s.error;
    if (s.state && !["stopped", "ready", "starting"].includes(s.state)) return s.state;
    return "";
  }

  function makeButton(label, aria, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.setAttribute("aria-label", aria);
    b.addEventListener("click", onClick);
    return b;
  }

  function makeRow(id) {
    const tr = document.createElement("tr");
    tr.dataset.model = id;
    const th = document.createElement("th");
    th.scope = "row";
    th.className = "id";
    th.textContent = id;
    tr.append(th);
    const cells = {};
    const labels = {
      source: "Source", status: "Status", memory: "Memory", inflight: "Requests",
      lastused: "Last used", restarts: "Restarts", actions: "",
    };
    for (const name of Object.keys(labels)) {
      const td = document.createElement("td");
      td.className = name;
      td.dataset.label = labels[name]; // shown as the field name in the narrow layout
      tr.append(td);
      cells[name] = td;
    }
    cells.pin = document.createElement("span");
    cells.pin.className = "badge";
    cells.pin.textContent = "pinned";
    cells.pin.title = "Never evicted to make room";
    th.append(cells.pin);
    cells.memText = document.createElement("span");
    cells.memText.className = "mem-text";
    cells.bar = document.createElement("div");
    cells.bar.className = "bar";
    cells.bar.setAttribute("role", "img");
    cells.barEst = document.createElement("span");
    cells.barEst.className = "est";
    cells.barUsed = document.createElement("span");
    cells.barUsed.className = "used";
    cells.barRss = document.createElement("span");
    cells.barRss.className = "rss";
    cells.bar.append(cells.barEst, cells.barUsed, cells.barRss);
    cells.memory.append(cells.memText, cells.bar);
    cells.fail = document.createElement("details");
    cells.fail.className = "fail";
    const summary = document.createElement("summary");
    summary.textContent = "last log lines";
    cells.failLog = document.createElement("pre");
    cells.failLog.tabIndex = 0; // it scrolls: keyboard users must be able to reach it
    cells.failLog.setAttribute("aria-label", `Last log lines of ${id}`);
    cells.fail.append(summary, cells.failLog);
    cells.word = document.createElement("span");
    cells.word.className = "word";
    cells.detail = document.createElement("span");
    cells.detail.className = "detail";
    cells.status.append(cells.word, cells.detail, cells.fail);
    cells.load = makeButton("Load", `Load ${id}`, () => loadModel(id));
    cells.unload = makeButton("Unload", `Unload ${id}`, () => unloadModel(id));
    cells.pinBtn = makeButton("Pin", `Pin ${id} (keep it loaded)`, () => pinModel(id, !pinned.get(id)));
    cells.logs = makeButton("Logs", `Show the log of ${id}`, () => showLogs(id));
    cells.actions.append(cells.load, cells.unload, cells.pinBtn, cells.logs);
    return { tr, cells };
  }

  function updateRow(item) {
    let row = rows.get(item.id);
    if (!row) {
      row = makeRow(item.id);
      rows.set(item.id, row);
    }
    const c = row.cells;
    const value = statusOf(item);
    const detail = statusDetail(item);
    c.source.textContent = item.source || "–";
    c.word.textContent = value;
    c.detail.textContent = detail;
    c.detail.title = detail;
    c.status.dataset.status = value;
    c.status.classList.toggle("failed", Boolean(item.status && item.status.failed));
    const mem = memoryOf(item);
    const text = fmtMemory(mem);
    c.memText.textContent = text;
    const scale = memoryScale();
    const pct = (n) => (scale && n ? Math.min(100, (100 * n) / scale).toFixed(1) + "%" : "0");
    c.barEst.style.width = pct(mem.estimated);
    c.barUsed.style.width = pct(mem.measured);
    c.barRss.style.width = pct(mem.rss);
    c.bar.hidden = text === "–";
    c.bar.setAttribute("aria-label", memInfo.budget
      ? `${text} of a ${fmtBytes(memInfo.budget)} budget` : text);
    c.pin.hidden = !item.pinned;
    pinned.set(item.id, Boolean(item.pinned));
    c.pinBtn.textContent = item.pinned ? "Unpin" : "Pin";
    c.pinBtn.setAttribute("aria-label", item.pinned ? `Unpin ${item.id}` : `Pin ${item.id} (keep it loaded)`);
    c.pinBtn.setAttribute("aria-pressed", item.pinned ? "true" : "false");
    const tail = (item.status && item.status.log_tail) || [];
    c.fail.hidden = !tail.length;
    c.failLog.textContent = tail.join("\n");
    const queued = item.queued ? ` (+${item.queued} queued)` : "";
    c.inflight.textContent = (item.in_flight ?? "–") + queued;
    const [short, full] = fmtTime(item.last_used);
    c.lastused.textContent = short;
    c.lastused.title = full;
    c.restarts.textContent = item.restarts ?? "–";
    c.load.disabled = value !== "unloaded";
    c.unload.disabled = value === "unloaded";
    return row;
  }

  function render(items) {
    const seen = new Set();
    const tbody = document.querySelector("#models tbody");
    items.forEach((item, i) => {
      seen.add(item.id);
      models.set(item.id, item);
      const { tr } = updateRow(item);
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
        models.delete(id);
      }
    }
    setTableMessage(items.length ? "" : "No models found.");
    renderModelSelect();
    fitTable();
  }

  // The table while it fits its panel, else cards (see style.css): the widths depend on the
  // names and the window, so this is measured rather than guessed with a media query.
  function fitTable() {
    const wrap = document.querySelector(".table-wrap");
    wrap.classList.remove("cards");
    if (wrap.scrollWidth > wrap.clientWidth + 1) wrap.classList.add("cards");
  }

  function renderBudget(mem) {
    const el = $("budget");
    if (!mem || !mem.budget) { el.textContent = ""; return; }
    el.textContent = `Memory budget ${fmtBytes(mem.budget)}: ${fmtBytes(mem.used)} held, ${fmtBytes(mem.free)} free.`;
  }

  function setTableMessage(text) {
    const el = $("models-msg");
    el.textContent = text;
    el.hidden = !text;
  }

  // Coalesces refreshes: while one is in flight, at most one more follows it.
  let refreshing = null;
  let refreshAgain = false;
  function refreshModels() {
    if (refreshing) { refreshAgain = true; return refreshing; }
    refreshing = (async () => {
      do {
        refreshAgain = false;
        try {
          // /memory adds the RSS and the budget; the table works without it.
          const [body, mem] = await Promise.all([
            api("/models").then((r) => r.json()),
            api("/memory").then((r) => r.json()).catch(() => null),
          ]);
          if (mem) memInfo = { budget: mem.budget || null, models: mem.models || {} };
          render(body.data || []);
          renderBudget(mem);
          if (authFailed) { authFailed = false; clearNotice(); }
        } catch (err) {
          if (err instanceof ApiError && err.status === 401) authFailed = true;
          setTableMessage(errorText(err, "Could not list the models"));
          report(err, "Could not list the models");
        }
      } while (refreshAgain);
      refreshing = null;
    })();
    return refreshing;
  }
  let authFailed = false;

  async function loadModel(id) {
    try {
      await postJSON("/models/load", { model: id });
    } catch (err) {
      if (!/already running/.test(err.message)) report(err, `Could not load ${id}`);
    }
    refreshModels();
  }

  const pinned = new Map();

  async function pinModel(id, on) {
    try {
      await postJSON("/models/pin", { model: id, pin: on });
    } catch (err) {
      report(err, `Could not ${on ? "pin" : "unpin"} ${id}`);
    }
    refreshModels();
  }

  async function unloadModel(id) {
    try {
      await postJSON("/models/unload", { model: id });
    } catch (err) {
      report(err, `Could not unload ${id}`);
    }
    refreshModels();
  }

  // ------------------------------------------------------------------ live events
  let events = null; // AbortController of the current /models/sse request
  let retries = 0;

  function setConn(text) { $("conn").textContent = text; }

  async function connectEvents() {
    if (events) events.abort();
    const ctl = new AbortController();
    events = ctl;
    setConn("connecting…");
    try {
      const resp = await api("/models/sse", { signal: ctl.signal, headers: { Accept: "text/event-stream" } });
      setConn("live");
      retries = 0;
      // Subscribed first, then listed: no change can fall between the two.
      refreshModels();
      await readEvents(resp, onEvent);
    } catch (err) {
      if (ctl.signal.aborted) return;
      if (err instanceof ApiError && err.status === 401) {
        setConn("not connected");
        authFailed = true;
        setTableMessage(errorText(err, "Could not list the models"));
        report(err, "Could not connect");
        return; // wait for a key
      }
      refreshModels(); // no live updates for now, but the table can still be listed
    }
    if (ctl.signal.aborted || events !== ctl) return;
    setConn("disconnected, reconnecting…");
    const delay = Math.min(30000, 500 * 2 ** retries++);
    setTimeout(() => { if (events === ctl) connectEvents(); }, delay);
  }

  function onEvent(text) {
    let ev;
    try { ev = JSON.parse(text); } catch { return; }
    const item = models.get(ev.model);
    const status = ev.data && ev.data.status;
    if (item && status && (ev.event === "model_status" || ev.event === "status_change")) {
      // Show the new word at once; the refresh below brings the other fields.
      item.status = { ...(item.status || {}), value: status };
      if (status !== "unloaded") delete item.status.failed;
      updateRow(item);
      renderModelSelect();
      announce(`${ev.model}: ${status}`);
    }
    refreshModels();
  }

  // ------------------------------------------------------------------ timeline
  // GET /dashboard/history: buckets of `step` seconds over the last `span` seconds, and
  // marks for loads, unloads/evictions and crashes. Drawn as plain SVG line charts.
  const PALETTE = ["#0b5cad", "#c2410c", "#15803d", "#7e22ce", "#b91c1c", "#0e7490", "#a16207", "#be185d"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const colours = new Map();
  function colourOf(name) {
    if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
    return colours.get(name);
  }

  function svgEl(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function fmtValue(v, unit) {
    if (unit === "bytes") return fmtBytes(v) || "0";
    if (unit === "s") return v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(1)} s`;
    return v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2);
  }

  // series: [{name, points: [[t, v], ...], dash?}]; marks: [{t, kind, model}].
  function lineChart(title, unit, series, hist) {
    const W = 400, H = 130, L = 46, R = 6, T = 8, B = 18;
    const t1 = hist.now, t0 = hist.now - hist.span;
    let top = 0;
    for (const s of series) for (const [, v] of s.points) top = Math.max(top, v);
    if (!top) top = unit === "bytes" ? 1024 * 1024 : 1;
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const fig = document.createElement("figure");
    const cap = document.createElement("figcaption");
    cap.textContent = title;
    const latest = series.map((s) => {
      const last = s.points[s.points.length - 1];
      return last ? `${s.name} ${fmtValue(last[1], unit)}` : null;
    }).filter(Boolean);
    const svg = svgEl("svg", {
      viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `${title} over the last ${Math.round(hist.span / 60)} minutes` +
        (latest.length ? `; latest: ${latest.join(", ")}` : "; no data yet"),
    });
    svg.append(svgEl("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    svg.append(svgEl("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    svg.append(svgEl("text", { class: "tick", x: L - 4, y: T + 8, "text-anchor": "end" }, fmtValue(top, unit)));
    svg.append(svgEl("text", { class: "tick", x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    svg.append(svgEl("text", { class: "tick", x: L, y: H - 4 }, `-${Math.round(hist.span / 60)} min`));
    svg.append(svgEl("text", { class: "tick", x: W - R, y: H - 4, "text-anchor": "end" }, "now"));
    for (const m of hist.marks) {
      const kind = m.kind === "load" || m.kind === "loaded" ? "load"
        : m.kind === "crash" ? "crash"
        : m.kind === "drain" || m.kind === "drained" ? "swap" : "evict";
      if (m.kind === "loaded") continue; // one mark per load: where it started
      const line = svgEl("line", { class: `m-${kind}`, x1: x(m.t), x2: x(m.t), y1: T, y2: H - B });
      line.append(svgEl("title", {}, `${m.model}: ${m.kind}`));
      svg.append(line);
    }
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
      const attrs = { class: "series", d, stroke: colourOf(s.key || s.name) };
      if (s.dash) attrs["stroke-dasharray"] = "4 3";
      svg.append(svgEl("path", attrs));
      // Dots too, so a lone bucket (a short burst) is visible, not a zero-length line.
      for (const [t, v] of s.points) {
        svg.append(svgEl("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 1.8, fill: colourOf(s.key || s.name) }));
      }
    }
    const keys = document.createElement("ul");
    keys.className = "chart-keys";
    for (const s of series) {
      const li = document.createElement("li");
      const swatch = document.createElement("i");
      swatch.style.background = colourOf(s.key || s.name);
      li.append(swatch, s.name);
      keys.append(li);
    }
    fig.append(cap, svg, keys);
    return fig;
  }

  function perModel(hist, pick) {
    const names = new Set();
    for (const b of hist.buckets) for (const m of Object.keys(b.models)) names.add(m);
    return [...names].sort().map((name) => ({
      name,
      points: hist.buckets.filter((b) => b.models[name] && pick(b.models[name]) != null)
        .map((b) => [b.t + hist.step / 2, pick(b.models[name])]),
    }));
  }

  function renderTimeline(hist) {
    const step = hist.step;
    const charts = [
      lineChart("Requests per second", "", perModel(hist, (m) => m.requests / step), hist),
      lineChart("Time to first token", "s", [
        { name: "p50", key: "p50", points: hist.buckets.filter((b) => b.ttft_p50 != null).map((b) => [b.t + step / 2, b.ttft_p50]) },
        { name: "p95", key: "p95", dash: true, points: hist.buckets.filter((b) => b.ttft_p95 != null).map((b) => [b.t + step / 2, b.ttft_p95]) },
      ], hist),
      lineChart("Tokens per second", "", perModel(hist, (m) => (m.tokens ? m.tokens / step : null)), hist),
      lineChart("Memory per model", "bytes", perModel(hist, (m) => m.memory_bytes ?? null), hist),
    ];
    $("charts").replaceChildren(...charts);
    const n = hist.buckets.reduce((a, b) => a + b.requests, 0);
    $("timeline-state").textContent = `${n} request${n === 1 ? "" : "s"}, ${hist.marks.length} event${hist.marks.length === 1 ? "" : "s"}`;
  }

  let timelineTimer = null;
  async function refreshTimeline() {
    clearTimeout(timelineTimer);
    let step = 5;
    if (document.hidden) { // nobody looks: read again when the page is shown
      document.addEventListener("visibilitychange", refreshTimeline, { once: true });
      return;
    }
    try {
      const hist = await (await api("/dashboard/history")).json();
      step = hist.step || step;
      renderTimeline(hist);
    } catch (err) {
      $("timeline-state").textContent = errorText(err, "Could not read the timeline");
    }
    // Polled: the history changes with every request, far more often than /models/sse says.
    timelineTimer = setTimeout(refreshTimeline, Math.max(1, step) * 1000);
  }

  // ------------------------------------------------------------------ logs
  let logs = null; // AbortController of the current log request
  let logModel = "";

  function showLogs(id) {
    logModel = id;
    $("logs-model").textContent = id;
    $("logs").hidden = false;
    fetchLogs();
    $("logs-text").focus();
  }

  async function fetchLogs() {
    if (logs) logs.abort();
    const ctl = new AbortController();
    logs = ctl;
    const pre = $("logs-text");
    const follow = $("logs-follow").checked;
    const url = `/models/logs?model=${encodeURIComponent(logModel)}&lines=200${follow ? "&follow=1" : ""}`;
    try {
      const resp = await api(url, { signal: ctl.signal });
      if (!follow) {
        pre.textContent = (await resp.text()) || "(empty)";
        pre.scrollTop = pre.scrollHeight;
        return;
      }
      pre.textContent = "";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        let text = pre.textContent + decoder.decode(value, { stream: true });
        if (text.length > 200000) text = text.slice(text.indexOf("\n", text.length - 150000) + 1);
        pre.textContent = text;
        pre.scrollTop = pre.scrollHeight;
      }
    } catch (err) {
      if (!ctl.signal.aborted) pre.textContent = errorText(err, "Could not read the log");
    }
  }

  function closeLogs() {
    if (logs) logs.abort();
    logs = null;
    $("logs").hidden = true;
  }

  // ------------------------------------------------------------------ chat
  const history = [];
  let chat = null; // AbortController of the running request

  function renderModelSelect() {
    const select = $("chat-model");
    const ids = [...models.keys()];
    const current = select.value;
    const same = select.options.length === ids.length && ids.every((id, i) => select.options[i].value === id);
    if (!same) {
      select.replaceChildren(...ids.map((id) => new Option(id, id)));
      if (ids.includes(current)) select.value = current;
      else {
        const loaded = ids.find((id) => statusOf(models.get(id)) === "loaded");
        if (loaded) select.value = loaded;
      }
    }
    for (const opt of select.options) opt.textContent = `${opt.value} (${statusOf(models.get(opt.value))})`;
    updateChatStatus();
  }

  function updateChatStatus() {
    const id = $("chat-model").value;
    const item = models.get(id);
    let text = "";
    if (item) {
      const value = statusOf(item);
      if (value === "loading") text = `${id}: loading…`;
      else if (value === "loaded") text = `${id}: loaded`;
      else if (value === "sleeping") text = `${id}: sleeping (wakes on the next message)`;
      else if (item.status && item.status.failed) text = `${id}: failed (${statusDetail(item)})`;
      else text = `${id}: not loaded`;
    }
    const el = $("chat-status");
    if (el.textContent !== text) el.textContent = text;
    el.dataset.status = item ? statusOf(item) : "";
  }

  function addMessage(role, text) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : $("chat-model").value || "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    content.innerHTML = renderMarkdown(text);
    const note = document.createElement("div");
    note.className = "note";
    div.append(who, content, note);
    $("transcript").append(div);
    div.scrollIntoView({ block: "end" });
    return { div, content, note };
  }

  function setStreaming(on) {
    $("chat-send").disabled = on;
    $("chat-stop").disabled = !on;
    $("transcript").setAttribute("aria-busy", on ? "true" : "false");
  }

  async function sendChat(text) {
    const model = $("chat-model").value;
    if (!model) { showNotice("Choose a model first."); return; }
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const out = addMessage("assistant", "");
    out.div.classList.add("streaming");
    const ctl = new AbortController();
    chat = ctl;
    setStreaming(true);
    let answer = "";
    let finished = false;
    try {
      const resp = await postJSON("/v1/chat/completions", { model, messages: history, stream: true }, ctl.signal);
      refreshModels();
      await readEvents(resp, (data) => {
        if (data === "[DONE]") { finished = true; return false; }
        let chunk;
        try { chunk = JSON.parse(data); } catch { return true; }
        if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message || "error in stream");
        const choice = (chunk.choices && chunk.choices[0]) || {};
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          answer += piece;
          out.content.innerHTML = renderMarkdown(answer);
          out.div.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finished = true;
        return true;
      });
      out.note.textContent = finished ? "" : "(the stream ended early)";
    } catch (err) {
      if (ctl.signal.aborted) out.note.textContent = "(stopped)";
      else {
        out.note.textContent = errorText(err, "Error");
        out.div.classList.add("error");
      }
    } finally {
      out.div.classList.remove("streaming");
      out.div.dataset.done = "true";
      if (answer) history.push({ role: "assistant", content: answer });
      else history.pop(); // keep user/assistant turns paired
      if (chat === ctl) chat = null;
      setStreaming(false);
      refreshModels();
    }
  }

  function stopChat() {
    if (!chat) return;
    chat.abort();
    $("chat-input").focus(); // the Stop button is about to be disabled
  }

  // ------------------------------------------------------------------ wiring
  function showKeyState() {
    $("key-state").textContent = apiKey ? "A key is saved in this browser." : "No key saved.";
  }

  function init() {
    showKeyState();
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      apiKey = $("api-key").value.trim();
      $("api-key").value = "";
      try {
        if (apiKey) localStorage.setItem(KEY_STORE, apiKey);
        else localStorage.removeItem(KEY_STORE);
      } catch { /* storage disabled: the key lasts for this page only */ }
      showKeyState();
      clearNotice();
      connectEvents();
      refreshTimeline();
    });
    $("key-forget").addEventListener("click", () => {
      apiKey = "";
      try { localStorage.removeItem(KEY_STORE); } catch { /* ignore */ }
      showKeyState();
      connectEvents();
    });
    $("refresh").addEventListener("click", () => { clearNotice(); refreshModels(); });
    $("logs-refresh").addEventListener("click", fetchLogs);
    $("logs-follow").addEventListener("change", fetchLogs);
    $("logs-close").addEventListener("click", closeLogs);
    $("chat-model").addEventListener("change", () => {
      const id = $("chat-model").value;
      updateChatStatus();
      if (statusOf(models.get(id)) === "unloaded") loadModel(id);
    });
    $("chat-clear").addEventListener("click", () => {
      stopChat();
      history.length = 0;
      $("transcript").replaceChildren();
    });
    $("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("chat-input");
      const text = input.value.trim();
      if (!text || chat) return;
      input.value = "";
      sendChat(text);
    });
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("chat-form").requestSubmit();
      } else if (e.key === "Escape" && chat) {
        stopChat();
      }
    });
    $("chat-stop").addEventListener("click", stopChat);
    // Served at `/` only when llama.cpp's UI is not built: say so, and drop the link to it.
    if (location.pathname === "/") {
      $("ui-note").hidden = false;
      $("chat-nav").hidden = true;
    }
    // Only a change of width can change the fit (rows re-fit in render()).
    let fittedWidth = 0;
    new ResizeObserver(([entry]) => {
      const width = Math.round(entry.contentRect.width);
      if (width !== fittedWidth) { fittedWidth = width; fitTable(); }
    }).observe(document.querySelector(".table-wrap"));
    connectEvents();
    refreshTimeline();
  }

  window.llamarouterUI = { renderMarkdown };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
