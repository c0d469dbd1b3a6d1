// The Fast VM web console: a full-window xterm.js terminal on the console
// WebSocket of the server (see crates/fastvm-server/src/console.rs).
//
// The one-shot token comes in the URL fragment (#session=fvc_...), which the
// browser never sends to a server; it is removed from the address bar before
// use. Binary frames carry terminal bytes both ways; text frames carry JSON
// control messages (resize from here; ready, exit, error from the server).
// Reconnecting needs a new token, so it is explicit: the bar offers a field
// for a new console URL or token.
(function () {
  "use strict";
  var statusEl = document.getElementById("status");
  var form = document.getElementById("reconnect");
  var field = document.getElementById("session");
  var term = new Terminal({ cursorBlink: true, scrollback: 5000, fontSize: 14,
    fontFamily: "DejaVu Sans Mono, Liberation Mono, monospace" });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  var encoder = new TextEncoder();
  var ws = null;
  // For tests and the curious: the terminal, the connection state, the last close.
  var state = { term: term, state: "idle", lastClose: null, messages: [] };
  window.fastvmConsole = state;

  function setStatus(text, kind) {
    statusEl.textContent = text;
    statusEl.className = kind || "";
  }

  function parseSession(text) {
    text = (text || "").trim();
    var hash = text.indexOf("#") >= 0 ? text.slice(text.indexOf("#") + 1) : text;
    var params = new URLSearchParams(hash);
    var token = params.get("session") || (/^fvc_[0-9a-f]+$/.test(hash) ? hash : null);
    return token ? { token: token, source: params.get("source") } : null;
  }

  function send(data) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
  }

  function connect(session) {
    form.hidden = true;
    var q = new URLSearchParams({ session: session.token, cols: String(term.cols), rows: String(term.rows) });
    if (session.source) q.set("source", session.source);
    var scheme = location.protocol === "https:" ? "wss:" : "ws:";
    setStatus("connecting...");
    state.state = "connecting";
    ws = new WebSocket(scheme + "//" + location.host + "/v1/console?" + q.toString());
    ws.binaryType = "arraybuffer";
    ws.onmessage = function (ev) {
      if (typeof ev.data !== "string") {
        term.write(new Uint8Array(ev.data));
        return;
      }
      var msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      state.messages.push(msg);
      if (msg.type === "ready") {
        state.state = "open";
        setStatus("connected to VM " + msg.vmId + (msg.source === "serial" ? " (serial console, read-only)" : ""), "ok");
        term.focus();
      } else if (msg.type === "exit") {
        setStatus("the shell exited with code " + msg.code);
      } else if (msg.type === "error") {
        setStatus(msg.message, "error");
      }
    };
    ws.onclose = function (ev) {
      state.state = "closed";
      state.lastClose = { code: ev.code, reason: ev.reason };
      var why = ev.reason ? ev.reason : (ev.code === 1006 ? "connection refused or lost (token expired or used?)" : "");
      setStatus("disconnected (" + ev.code + (why ? ": " + why : "") + ")", ev.code === 1000 ? "" : "error");
      form.hidden = false;
      ws = null;
    };
  }

  term.onData(function (data) { send(encoder.encode(data)); });
  term.onBinary(function (data) {
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    send(bytes);
  });
  term.onResize(function (size) {
    send(JSON.stringify({ type: "resize", cols: size.cols, rows: size.rows }));
  });
  window.addEventListener("resize", function () { fit.fit(); });
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var session = parseSession(field.value);
    field.value = "";
    if (session) connect(session); else setStatus("that is not a console URL or token", "error");
  });

  var initial = parseSession(location.hash);
  // The token is a credential: keep it out of the address bar and history.
  history.replaceState(null, "", location.pathname);
  if (initial) {
    connect(initial);
  } else {
    setStatus("no console token in the URL");
    form.hidden = false;
  }
})();
