// Pages showing work in progress reload themselves (body data-refresh-s), but never while someone
// is typing in a form or has text selected.
(function () {
  var seconds = Number(document.body.dataset.refreshS);
  if (!seconds) return;
  setInterval(function () {
    var active = document.activeElement;
    var typing = active && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
    var selecting = String(window.getSelection ? window.getSelection() : "").length > 0;
    if (!typing && !selecting && document.visibilityState !== "hidden") window.location.reload();
  }, seconds * 1000);
})();
