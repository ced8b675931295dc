// Live-connection indicator for the htmx websocket extension: the page says when it is live, when it
// is reconnecting (the extension retries with backoff and the server sends a fresh snapshot), and when
// the session ended (close code 4403: log in again).
(function () {
  function badge() { return document.getElementById("live-state"); }
  document.addEventListener("htmx:wsOpen", function () {
    var el = badge(); if (!el) return;
    el.hidden = false; el.className = "live-state on"; el.textContent = "● live";
  });
  document.addEventListener("htmx:wsClose", function (evt) {
    var el = badge(); if (!el) return;
    var code = evt.detail && evt.detail.event ? evt.detail.event.code : 0;
    el.hidden = false; el.className = "live-state off";
    el.textContent = code === 4403 ? "signed out: reload to log in" : "○ reconnecting…";
  });
})();
