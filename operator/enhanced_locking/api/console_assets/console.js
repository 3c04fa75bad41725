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

  function show(event) {
    var empty = list.querySelector(".empty");
    if (empty) { empty.remove(); }
    var item = document.createElement("li");
    item.className = "event " + event.type;
    var pull = event.lock && event.lock.pull ? " #" + event.lock.pull.num : "";
    var what = event.key || (event.details && event.details.name) || "";
    item.textContent = (event.time || "").replace("T", " ").slice(0, 19) + "  " + event.type +
      "  " + what + pull;
    list.insertBefore(item, list.firstChild);
    while (list.children.length > 50) { list.removeChild(list.lastChild); }
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
  ["acquired", "released", "queued", "granted-from-queue", "timeout", "cancelled", "expired",
   "deadlock", "force-unlocked", "fallback", "routing-changed", "config-applied",
   "lock-conflict", "rollout-changed", "gap"].forEach(function (type) {
    source.addEventListener(type, function (message) {
      try { show(JSON.parse(message.data)); } catch (error) { /* a gap has no event shape */ }
      soon();
    });
  });
  // A pause's time left moves on its own: refresh once in a while too.
  window.setInterval(soon, 5000);
})();
