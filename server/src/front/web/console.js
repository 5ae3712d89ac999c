// Live updates for operation pages: polls the operation until it finishes and swaps in its rendered view.
// Everything else in the console works without JavaScript.
"use strict";
(function () {
  const box = document.querySelector("[data-operation]");
  if (!box) return;
  const id = box.dataset.operation;
  const cancelForm = document.getElementById("cancel-form");
  async function poll() {
    let finished = false;
    try {
      const res = await fetch("/api/operations/" + encodeURIComponent(id), { credentials: "same-origin" });
      if (res.ok) {
        const body = await res.json();
        box.innerHTML = body.html;
        finished = body.operation.state !== "running";
      }
    } catch (e) {
      // The daemon restarting is not the end of the operation's page: keep trying.
    }
    if (finished) {
      if (cancelForm) cancelForm.remove();
    } else {
      setTimeout(poll, 1000);
    }
  }
  if (box.querySelector("#op-state").dataset.state === "running") setTimeout(poll, 1000);
})();
