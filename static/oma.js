// Live-connection indicator for the htmx websocket extension: the page says when it is live, when it
// is reconnecting (the extension retries with backoff and the server sends a fresh snapshot), and when
// the session ended (close code 4403: log in again).
(function () {
  // Fragments pushed over the websocket are rendered once for every viewer, so their forms carry no
  // CSRF token: add this page's token to any POST form that lacks one, just before it is submitted.
  document.addEventListener("submit", function (evt) {
    var form = evt.target;
    if (!form || (form.method || "").toLowerCase() !== "post") return;
    var meta = document.querySelector("meta[name=csrf-token]");
    var field = form.querySelector("input[name=csrfmiddlewaretoken]");
    if (!meta || (field && field.value)) return;
    if (!field) {
      field = document.createElement("input");
      field.type = "hidden";
      field.name = "csrfmiddlewaretoken";
      form.appendChild(field);
    }
    field.value = meta.content;
  }, true);

  // A button whose form says what it will do asks first (Cancel, Retry, failovers, rollbacks).
  document.addEventListener("submit", function (evt) {
    var form = evt.target;
    var question = form && form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) evt.preventDefault();
  });

  // A live refresh of a table (the inventory's) must not drop the VMs the operator has ticked.
  var ticked = null;
  document.addEventListener("htmx:beforeSwap", function (evt) {
    var target = evt.detail.target;
    if (!target || !target.querySelectorAll) return;
    ticked = Array.prototype.map.call(target.querySelectorAll("input[type=checkbox]:checked"), function (box) {
      return box.name + "=" + box.value;
    });
  });
  document.addEventListener("htmx:afterSwap", function (evt) {
    if (!ticked || !ticked.length) { ticked = null; return; }
    var keep = ticked; ticked = null;
    var root = document.getElementById(evt.detail.target.id) || evt.detail.target;
    Array.prototype.forEach.call(root.querySelectorAll("input[type=checkbox]"), function (box) {
      if (keep.indexOf(box.name + "=" + box.value) >= 0 && !box.disabled) box.checked = true;
    });
  });

  function badge() { return document.getElementById("live-state"); }
  document.addEventListener("htmx:wsOpen", function () {
    var el = badge(); if (!el) return;
    el.hidden = false; el.className = "live-state on"; el.textContent = "● live";
  });
  document.addEventListener("htmx:wsClose", function (evt) {
    var el = badge(); if (!el) return;
    var code = evt.detail && evt.detail.event ? evt.detail.event.code : 0;
    el.hidden = false; el.className = "live-state off";
    el.textContent = code === 4403 ? "signed out: reload to log in" : code === 4404 ? "not live" : "○ reconnecting…";
  });
})();
