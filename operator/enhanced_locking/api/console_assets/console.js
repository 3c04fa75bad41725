// The console's live part: follow the service's event stream (GET /v1/events) and, when
// something happens, fetch the page's sections again (GET /ui/sections, the same HTML the
// page was rendered with) and swap them in. Without this script the page is the same, static.
(function () {
  "use strict";
  var query = window.location.search;
  var params = new URLSearchParams(query);
  var sections = document.getElementById("sections");
  var list = document.getElementById("event-list");
  var live = document.getElementById("live");
  var pending = null;

  function refresh() {
    pending = null;
    fetch("/ui/sections" + query, {credentials: "same-origin"})
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (text) { if (text !== null) { sections.innerHTML = text; } })
      .catch(function () {});
  }

  function soon() {
    if (pending === null) { pending = window.setTimeout(refresh, 100); }
  }

  function add(className, text) {
    var empty = list.querySelector(".empty");
    if (empty) { empty.remove(); }
    var item = document.createElement("li");
    item.className = className;
    item.textContent = text;
    list.insertBefore(item, list.firstChild);
    while (list.children.length > 50) { list.removeChild(list.lastChild); }
  }

  function show(event) {
    var details = event.details || {};
    var num = event.lock && event.lock.pull ? event.lock.pull.num : details.pull;
    var pull = num !== undefined && num !== null ? " #" + num : "";
    var what = event.key || details.name || details.freeze || "";
    add("event " + event.type, (event.time || "").replace("T", " ").slice(0, 19) + "  " +
      event.type + "  " + what + pull);
  }

  // Events were lost on the way (the stream fell behind, resumed after a restart, its store
  // switched): not an event, so said as what it is; the sections are read again.
  function gap(data) {
    add("event gap", "gap: some events were not received (" + (data.reason || "unknown") +
      "); the locks and queues above were read again");
  }

  var stream = "/v1/events";
  if (params.get("repo")) { stream += "?repo=" + encodeURIComponent(params.get("repo")); }
  var source = new EventSource(stream);
  source.onopen = function () {
    live.textContent = "live";
    live.className = "live on";
    soon();  // whatever happened before the stream opened
  };
  source.onerror = function () {
    live.textContent = "reconnecting…";
    live.className = "live off";
  };
  source.onmessage = function () {};
  // Every type the service publishes, as the page lists them (the one list is the service's).
  (list.getAttribute("data-types") || "").split(",").forEach(function (type) {
    if (!type) { return; }
    source.addEventListener(type, function (message) {
      try { show(JSON.parse(message.data)); } catch (error) { /* not JSON: nothing to show */ }
      soon();
    });
  });
  source.addEventListener("gap", function (message) {
    var data = {};
    try { data = JSON.parse(message.data) || {}; } catch (error) { /* said without a reason */ }
    gap(data);
    soon();
  });
  // A pause's time left moves on its own: refresh once in a while too.
  window.setInterval(soon, 5000);
})();
