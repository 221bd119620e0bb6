// The muxtwist stats page: fetch the page again every few seconds and swap
// in its numbers, so the page stays where it is scrolled. The server escapes
// every value; the fetched document is parsed inert (its scripts never run).
"use strict";
(function () {
  const seconds = Number(document.body.dataset.refresh) || 2;
  const updated = document.getElementById("updated");
  let last = new Date();

  async function refresh() {
    try {
      const response = await fetch(window.location.href, { cache: "no-store" });
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("stats");
      if (fresh === null) {
        throw new Error("no numbers in the answer");
      }
      document.getElementById("stats").replaceWith(document.adoptNode(fresh));
      last = new Date();
      updated.textContent = "updated " + last.toLocaleTimeString();
      updated.className = "";
    } catch (e) {
      updated.textContent = "not updated since " + last.toLocaleTimeString() + " (" + e.message + ")";
      updated.className = "down";
    } finally {
      window.setTimeout(refresh, seconds * 1000);
    }
  }

  window.setTimeout(refresh, seconds * 1000);
})();
