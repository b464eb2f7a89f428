// jwtproxy status page: fetches GET /status every few seconds and redraws in place.
//
// The admin token (when the daemon has one) comes once from the URL fragment (#token=...,
// never sent to a server) or from the form shown on a 401, lives in sessionStorage (this tab
// only) and travels as "Authorization: Bearer" on each fetch. Everything is drawn with
// textContent: error texts can hold bytes chosen by a remote identity provider.
"use strict";

(function () {
  const REFRESH_MS = 3000;
  const TOKEN_KEY = "jwtproxy-admin-token";
  const $ = (id) => document.getElementById(id);

  let timer = null;
  let lastGood = 0;     // Date.now() of the last successful fetch

  // ---------------------------------------------------------------- token

  function takeTokenFromFragment() {
    const hash = window.location.hash;
    if (hash.startsWith("#token=")) {
      const token = decodeURIComponent(hash.slice("#token=".length));
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      // Out of the address bar, the history and any screenshot.
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
  }

  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function showLogin(message) {
    $("content").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    setBadge("readiness", "token needed", "warn");
    $("token-input").focus();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();   // never a navigation: the token must not land in a URL
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("login").hidden = true;
    refresh();
  });

  // ---------------------------------------------------------------- formatting

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + (s % 60) + " s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " min";
    return Math.floor(h / 24) + " d " + (h % 24) + " h";
  }

  function when(unix, now) {
    if (unix === null || unix === undefined) return "–";
    const delta = unix - now;
    return delta >= 0 ? "in " + duration(delta) : duration(-delta) + " ago";
  }

  function iso(unix) {
    return unix === null || unix === undefined ? "" : new Date(unix * 1000).toISOString();
  }

  function rate(value) {
    if (value === null || value === undefined) return "–";
    return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
  }

  // ---------------------------------------------------------------- DOM helpers

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = el("tr");
    for (const cell of cells) {
      if (cell instanceof Node) {
        const td = el("td");
        td.appendChild(cell);
        tr.appendChild(td);
      } else if (Array.isArray(cell)) {
        tr.appendChild(el("td", cell[0], cell[1]));
      } else {
        tr.appendChild(el("td", cell));
      }
    }
    return tr;
  }

  function fillBody(table, rows, columns, emptyText) {
    const body = table.tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const td = el("td", emptyText, "empty");
      td.colSpan = columns;
      const tr = el("tr");
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    for (const r of rows) body.appendChild(r);
  }

  function facts(dl, pairs) {
    dl.replaceChildren();
    for (const [name, value, className] of pairs) {
      dl.appendChild(el("dt", name));
      const dd = el("dd", value, className);
      dl.appendChild(dd);
    }
  }

  function setBadge(id, text, level) {
    const badge = $(id);
    badge.textContent = text;
    badge.className = "badge " + (level || "");
  }

  // ---------------------------------------------------------------- sections

  function renderTraffic(t) {
    $("req-rate").textContent = rate(t.requests_per_second);
    $("req-count").textContent = t.requests;
    $("fail-rate").textContent = rate(t.auth_failures_per_second);
    $("fail-count").textContent = t.auth_failures;
    $("window").textContent = t.window_seconds >= 59
      ? "Over the last " + duration(t.window_seconds) + "."
      : "Over the " + duration(t.window_seconds) + " since the page's figures began (a minute once the daemon has run one).";
    const reasons = Object.entries(t.auth_failures_by_reason).map(([reason, n]) => row([
      [reason, "mono"], [n, "num"],
      [t.window_seconds > 0 ? rate(n / t.window_seconds) : "–", "num"],
    ]));
    fillBody($("reasons"), reasons, 3, "none");
    const classes = Object.entries(t.by_status_class).filter(([, n]) => n > 0)
      .map(([klass, n]) => row([klass, [n, "num"]]));
    fillBody($("classes"), classes, 2, "no requests");
  }

  function renderIssuer(issuer, now) {
    const card = el("section", null, "card issuer");
    card.dataset.issuer = issuer.name;
    const title = el("h2");
    title.appendChild(el("span", "Issuer " + issuer.name + " "));
    const allLoaded = issuer.workers > 0 && issuer.loaded_workers === issuer.workers;
    const badge = el("span", issuer.loaded_workers + "/" + issuer.workers + " workers have keys",
      "badge " + (allLoaded ? "ok" : "bad"));
    title.appendChild(badge);
    card.appendChild(title);

    const dl = el("dl", null, "facts");
    const failure = issuer.last_failure;
    facts(dl, [
      ["iss", issuer.issuer, "mono"],
      ["source", issuer.source_kind + ": " + issuer.source, "mono"],
      ["allowed algs", issuer.algorithms.join(" "), "mono"],
      ["last refresh", when(issuer.last_refresh, now)],
      ["next refresh", issuer.source_kind === "jwks_file" ? "on SIGHUP" : when(issuer.next_refresh, now)],
      ["current error", issuer.errors.length ? issuer.errors.join("; ") : "none",
        issuer.errors.length ? "error" : ""],
      ["last error", failure ? failure.reason + " (" + when(failure.at, now) + ")" : "none",
        failure ? "error" : ""],
    ]);
    const dds = dl.querySelectorAll("dd");
    dds[3].title = iso(issuer.last_refresh);
    dds[4].title = iso(issuer.next_refresh);
    card.appendChild(dl);

    card.appendChild(el("h3", "Keys"));
    const table = el("table", null, "keys");
    const head = el("thead");
    const headRow = el("tr");
    for (const [text, className] of [["kid"], ["alg"], ["workers", "num"]]) {
      headRow.appendChild(el("th", text, className));
    }
    head.appendChild(headRow);
    table.appendChild(head);
    table.appendChild(el("tbody"));
    const keys = issuer.keys.map((k) => row([
      [k.kid === null ? "(no kid)" : k.kid, "mono kid"], [k.alg, "mono"], [k.workers, "num"],
    ]));
    fillBody(table, keys, 3, issuer.source_kind === "hs_secret" ? "HMAC secret (no JWKS)" : "no keys loaded");
    const scroll = el("div", null, "scroll");
    scroll.appendChild(table);
    card.appendChild(scroll);
    return card;
  }

  function renderWorkers(workers, generation) {
    const rows = workers.map((w) => row([
      String(w.id), [w.pid, "mono"], [w.generation + (w.generation === generation ? "" : " (old)"), "num"],
      [w.state, w.state === "ready" ? "" : "muted"], [duration(w.uptime), "num"],
      [w.connections === null || w.connections === undefined ? "–" : w.connections, "num"],
    ]));
    fillBody($("workers").querySelector("table"), rows, 6, "no workers");
  }

  function renderRevocation(r) {
    const pairs = [
      ["backend", r.backend === null ? "–" : r.backend],
      ["state", r.state, r.state === "up" ? "" : "error"],
    ];
    if ("jti" in r) pairs.push(["revoked tokens (jti)", String(r.jti)]);
    if ("sub" in r) pairs.push(["revoked subjects (sub)", String(r.sub)]);
    if (r.path) pairs.push(["file", r.path, "mono"]);
    if (r.url) pairs.push(["url", r.url, "mono"]);
    if (r.last_error) pairs.push(["last error", r.last_error, "error"]);
    facts($("revocation").querySelector("dl"), pairs);
  }

  // Sections a feature adds draw themselves from their own key of the document.
  const SECTIONS = [
    (doc) => renderTraffic(doc.traffic),
    (doc) => {
      const now = doc.time;
      $("issuers").replaceChildren(...doc.issuers.map((i) => renderIssuer(i, now)));
    },
    (doc) => renderWorkers(doc.workers, doc.generation),
    (doc) => renderRevocation(doc.revocation),
  ];

  function render(doc) {
    $("version").textContent = "v" + doc.version + " · up " + duration(doc.uptime) + " · generation " + doc.generation;
    if (doc.ready) {
      setBadge("readiness", "ready", "ok");
      $("readiness").title = "";
    } else {
      setBadge("readiness", "not ready", "bad");
      $("readiness").title = doc.not_ready.join("; ");
    }
    for (const section of SECTIONS) section(doc);
    $("content").hidden = false;
    $("content").classList.remove("stale");
  }

  // ---------------------------------------------------------------- polling

  function showFreshness(problem) {
    const age = lastGood ? Math.round((Date.now() - lastGood) / 1000) : null;
    const text = problem
      ? problem + (age === null ? "" : " · data from " + duration(age) + " ago")
      : "updated " + new Date(lastGood).toLocaleTimeString();
    $("freshness").textContent = text;
    $("freshness").className = problem ? "error" : "muted";
    if (problem) $("content").classList.add("stale");
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const response = await fetch("status", {
        headers: authHeaders(), cache: "no-store", credentials: "omit",
      });
      if (response.status === 401) {
        const had = sessionStorage.getItem(TOKEN_KEY) !== null;
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin(had ? "That token was not accepted." : "");
        return;   // polling resumes when a token is submitted
      }
      if (!response.ok) throw new Error("GET /status answered " + response.status);
      render(await response.json());
      lastGood = Date.now();
      showFreshness("");
    } catch (error) {
      showFreshness("cannot reach the daemon (" + (error && error.message ? error.message : error) + ")");
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  takeTokenFromFragment();
  refresh();
})();
