"use strict";
// Sortable tables: click (or Enter on) a header; numbers sort as numbers (the leading number of "0.73 ± 0.01"),
// the rest as text; a second click reverses.
(function () {
  function key(cell) {
    var t = cell.textContent.trim();
    var m = t.match(/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/i);
    return m ? { n: parseFloat(m[0]), t: t } : { n: null, t: t };
  }
  function sort(th) {
    var table = th.closest("table");
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]), r;
      if (x.n !== null && y.n !== null) r = x.n - y.n;
      else if (x.n !== null) r = -1;
      else if (y.n !== null) r = 1;
      else r = x.t.localeCompare(y.t);
      return asc ? r : -r;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () { sort(th); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(th); });
  });
})();
