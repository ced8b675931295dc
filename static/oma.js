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

  // Elapsed times tick ("running for 42 s"): the server rendered them once, the clock moves on here.
  function span(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.round(seconds / 60) + " min";
    var hours = Math.floor(seconds / 3600), minutes = Math.floor((seconds % 3600) / 60);
    return hours + " h " + (minutes < 10 ? "0" : "") + minutes + " min";
  }
  function tick() {
    Array.prototype.forEach.call(document.querySelectorAll("[data-since]"), function (el) {
      var since = Date.parse(el.getAttribute("data-since"));
      if (!isNaN(since)) el.textContent = span((Date.now() - since) / 1000);
    });
  }
  setInterval(tick, 1000);

  // Times in the viewer's own zone, with the zone shown; the server's UTC time stays in the title.
  function pad(n, width) { n = String(n); while (n.length < (width || 2)) n = "0" + n; return n; }
  function localTimes(root) {
    Array.prototype.forEach.call((root || document).querySelectorAll("time[datetime]"), function (el) {
      if (el.getAttribute("data-local")) return;
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when.getTime())) return;
      var parts = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" }).formatToParts(when);
      var zone = parts.filter(function (p) { return p.type === "timeZoneName"; }).map(function (p) { return p.value; })[0] || "";
      var clock = pad(when.getHours()) + ":" + pad(when.getMinutes()) + ":" + pad(when.getSeconds());
      var shown = el.textContent.trim();
      // A time of day (the event log's) stays one; a date and time stays both.
      el.textContent = shown.length <= 12 ? clock + "." + pad(when.getMilliseconds(), 3)
        : when.getFullYear() + "-" + pad(when.getMonth() + 1) + "-" + pad(when.getDate()) + " " + clock + " " + zone;
      el.title = el.getAttribute("datetime") + " (" + zone + " shown)";
      el.setAttribute("data-local", "1");
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localTimes(document); tick(); });
  document.addEventListener("htmx:load", function (evt) { localTimes(evt.target); });

  // Live swaps are announced to screen readers: a job whose state changed says so once, politely.
  var heard = {};
  function announce(root) {
    var box = document.getElementById("announcer");
    if (!box || !root || !root.querySelectorAll) return;
    var states = root.matches && root.matches("[data-announce]") ? [root] : [];
    states = states.concat(Array.prototype.slice.call(root.querySelectorAll("[data-announce]")));
    states.forEach(function (el) {
      var key = el.getAttribute("data-announce"), text = el.textContent.trim();
      if (heard[key] !== undefined && heard[key] !== text) box.textContent = key + ": " + text;
      heard[key] = text;
    });
  }
  document.addEventListener("DOMContentLoaded", function () { announce(document.body); });
  // An outerHTML swap's event may name the element it replaced: read the one now in the page.
  function swapped(evt) {
    var target = evt.detail.target;
    return (target && target.id && document.getElementById(target.id)) || target;
  }
  document.addEventListener("htmx:oobAfterSwap", function (evt) {
    announce(swapped(evt)); localTimes(swapped(evt));
    if (typeof scrollables === "function") scrollables();
  });
  document.addEventListener("htmx:afterSwap", function (evt) { announce(swapped(evt)); });

  // The inventory as a plan builder: select all, "3 selected, 1.5 GiB", Migrate only with a selection.
  function human(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return (i ? bytes.toFixed(1) : bytes) + " " + units[i];
  }
  function selection() {
    var form = document.getElementById("migrate-form");
    if (!form) return;
    var boxes = form.querySelectorAll("input[name=vm]:not(:disabled)");
    var ticked = form.querySelectorAll("input[name=vm]:checked");
    var bytes = 0;
    Array.prototype.forEach.call(ticked, function (box) { bytes += Number(box.getAttribute("data-bytes") || 0); });
    var label = document.getElementById("selection"), button = document.getElementById("migrate-button");
    var all = document.getElementById("select-all");
    if (label) label.textContent = ticked.length ? ticked.length + " selected, " + human(bytes) : "Nothing selected.";
    if (button) button.disabled = !ticked.length;
    if (all) { all.checked = boxes.length > 0 && ticked.length === boxes.length; all.indeterminate = ticked.length > 0 && ticked.length < boxes.length; }
  }
  document.addEventListener("change", function (evt) {
    var el = evt.target;
    if (el && el.id === "select-all") {
      Array.prototype.forEach.call(document.querySelectorAll("#migrate-form input[name=vm]:not(:disabled)"), function (box) { box.checked = el.checked; });
    }
    if (el && (el.id === "select-all" || el.name === "vm")) selection();
  });
  document.addEventListener("DOMContentLoaded", selection);
  document.addEventListener("htmx:afterSwap", selection);

  // A table that scrolls inside its own box (narrow screens) can be scrolled from the keyboard.
  function scrollables() {
    Array.prototype.forEach.call(document.querySelectorAll(".table, .table-wrap, .event-list"), function (el) {
      if (el.scrollWidth > el.clientWidth + 1 || el.scrollHeight > el.clientHeight + 1) {
        if (!el.hasAttribute("tabindex")) el.setAttribute("tabindex", "0");
      } else if (el.getAttribute("tabindex") === "0") {
        el.removeAttribute("tabindex");
      }
    });
  }
  document.addEventListener("DOMContentLoaded", scrollables);
  document.addEventListener("htmx:afterSettle", scrollables);
  window.addEventListener("resize", scrollables);

  // The jobs list hears of every job; a row it does not show (a new job, another page's) is not swapped
  // blind (htmx would log oobErrorNoTarget): the list fetches its own table again instead, with its
  // filters, order and page, at most every two seconds. New jobs appear that way.
  var refreshing = null;
  function refreshTable(id) {
    if (refreshing) return;
    refreshing = setTimeout(function () {
      refreshing = null;
      if (document.getElementById(id)) htmx.ajax("GET", location.pathname + location.search, { target: "#" + id, swap: "outerHTML" });
    }, 2000);
  }
  if (window.htmx) htmx.defineExtension("oma-rows", {
    transformResponse: function (text) {
      if (text.indexOf('id="job-row-') < 0) return text;
      var holder = document.createElement("template");
      holder.innerHTML = text;
      var missing = false;
      Array.prototype.slice.call(holder.content.children).forEach(function (el) {
        if (el.id && el.id.indexOf("job-row-") === 0 && !document.getElementById(el.id)) { el.remove(); missing = true; }
      });
      if (missing) refreshTable("job-table");
      return holder.innerHTML;
    }
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
