"""The web client's stylesheet and script, kept as Python strings (no package data to install).

The script only enhances the pages: live progress from the server-sent events stream, and upload
progress bars. Every form also works without it (plain POST, then a redirect). The pages allow
no inline script or style (Content-Security-Policy), so everything lives here.
"""

from clients.score_html import BADGE_CSS, SCORE_CSS, TABLE_CSS

CSS = """
*{box-sizing:border-box}
[hidden]{display:none !important}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2330;
background:#f5f6f8;margin:0}
header.top{background:#1f2a44;color:#fff;padding:0 28px;display:flex;align-items:center;gap:22px;height:52px}
header.top a{color:#fff;text-decoration:none}
header.top .brand{font-weight:700;font-size:17px;letter-spacing:.2px}
header.top nav{display:flex;gap:16px;flex:1}
header.top nav a{opacity:.85}header.top nav a:hover{opacity:1;text-decoration:underline}
header.top .who{font-size:13px;opacity:.9}
header.top form{margin:0}
header.top button{background:transparent;border:1px solid #8391b3;color:#fff;padding:3px 10px;font-size:13px}
main{max-width:1180px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:24px;margin:0 0 2px;line-height:1.25}
h2{font-size:19px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #dfe2e8}
h3{font-size:16px;margin:16px 0 8px}
.sub{color:#5b6475;margin:0 0 14px}
a{color:#2f57a8}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:13px}
.panel{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:14px 18px;margin:12px 0}
.panel h3:first-child{margin-top:0}
.grid2{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;align-items:start}
.grid3{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:16px;align-items:start}
.step{display:inline-flex;width:26px;height:26px;border-radius:13px;background:#4a72c4;color:#fff;
align-items:center;justify-content:center;font-size:14px;font-weight:700;margin-right:8px}
.step.ok{background:#2e8b57}
.flash{border-radius:6px;padding:10px 16px;margin:0 0 14px;border:1px solid}
.flash.error{background:#fdecea;border-color:#f1b0a8;color:#8a1c10}
.flash.info{background:#eaf4ec;border-color:#a9d2b3;color:#1d5a2e}
.flash .code{font-weight:700;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;margin-right:6px}
.note{color:#5b6475;font-size:13px;margin:6px 0}
.pager{margin:12px 0;font-size:14px}
.warn{background:#fffaf0;border-left:4px solid #d08a00;padding:8px 14px;border-radius:4px;margin:10px 0}
form.inline{display:inline}
label{display:block;font-size:13px;color:#3b4355;margin:8px 0 2px;font-weight:600}
label.check{display:flex;gap:6px;align-items:center;font-weight:400}
input[type=text],input[type=number],input[type=password],select{width:100%;padding:6px 8px;
border:1px solid #c9ced8;border-radius:5px;font:inherit;background:#fff}
input[type=file]{font-size:13px;margin:4px 0}
.fields{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:4px 14px}
.fields.f3{grid-template-columns:repeat(3,minmax(0,1fr))}
.span2{grid-column:span 2}
.rank{font-size:13px;color:#5b6475;font-weight:600;margin-right:6px}
.jobs h3{margin:0 0 4px;font-size:14px;color:#5b6475}
button,.button{display:inline-block;background:#2f57a8;color:#fff;border:0;border-radius:5px;padding:7px 14px;
font:inherit;font-size:14px;cursor:pointer;text-decoration:none;margin-top:10px}
button.secondary,.button.secondary{background:#e8ecf4;color:#1d2330}
button:disabled{opacity:.5;cursor:default}
"""+TABLE_CSS+"""figure{margin:10px 0;background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:8px}
figcaption{color:#5b6475;font-size:13px;padding:4px 6px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:8px 12px;min-width:110px;flex:1 1 0}
.card b{display:block;font-size:21px;line-height:1.3}.card span{color:#5b6475;font-size:13px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(64px,1fr));gap:6px;margin:8px 0}
.gallery label{margin:0;font-weight:400;border:1px solid #d5d9e0;border-radius:6px;padding:3px;text-align:center;
background:#fff;cursor:pointer;font-size:11px;color:#5b6475}
.gallery label:has(input:checked){border-color:#2f57a8;background:#e6eefc;box-shadow:0 0 0 2px #2f57a8}
.gallery img{width:56px;height:56px;image-rendering:pixelated;display:block;margin:0 auto}
.gallery input{margin:2px}
.samplerows{max-height:420px;overflow:auto;margin:8px 0}.samplerows table{font-size:12px}
.samplerows th,.samplerows td{padding:2px 6px}
.record{display:grid;grid-template-columns:84px minmax(0,1fr) 500px;gap:18px;background:#fff;
border:1px solid #e1e4ea;border-radius:8px;padding:12px 16px;margin:10px 0;align-items:center}
.record h3{margin:0 0 2px;font-size:14px;word-break:break-all}
.record .reading{margin:6px 0;font-size:15px}
.record .facts{color:#5b6475;font-size:13px}
"""+SCORE_CSS+"""td .thumb{width:44px;height:44px}
"""+BADGE_CSS+""".state{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;background:#e6ebf5;
color:#34496e}
.state.done,.state.scored{background:#e3f2e7;color:#1d6532}.state.failed{background:#fbd9d6;color:#9b1209}
.state.running,.state.finetuning,.state.scoring,.state.preparing,.state.in_round{background:#fff1cc;color:#7d4a00}
.progress{display:flex;align-items:center;gap:10px;margin:6px 0}
.progress progress{flex:1;height:14px}
.progress .label{font-size:13px;min-width:300px}
.progress .count{font-size:13px;color:#5b6475;font-variant-numeric:tabular-nums;min-width:90px;text-align:right}
.jobs:empty{display:none}
.asset{border-top:1px solid #eceef2;padding-top:8px;margin-top:8px}
.asset:first-of-type{border-top:0;margin-top:0;padding-top:0}
.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:14px}
.kv dt{color:#5b6475}.kv dd{margin:0}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
svg.iv{vertical-align:middle}
.signin{max-width:520px;margin:40px auto}
footer{color:#7a8294;font-size:12px;margin-top:40px}
@media (max-width:980px){.record{grid-template-columns:84px minmax(0,1fr)}.record .diag{grid-column:1/-1}
.grid2,.grid3{grid-template-columns:1fr}.fields{grid-template-columns:1fr 1fr}}
"""

JS = r"""
(function () {
  "use strict";
  var TERMINAL = {done: 1, failed: 1, scored: 1};

  // Live progress: the server streams the state of this page's jobs and rounds (fed by the
  // gRPC WatchRound stream); when one the page showed as running ends, reload to show results.
  var events = document.body.getAttribute("data-events");
  if (events && window.EventSource) {
    var source = new EventSource(events);
    source.onmessage = function (msg) {
      var data;
      try { data = JSON.parse(msg.data); } catch (e) { return; }
      var reload = false;
      (data.items || []).forEach(function (it) {
        var el = document.querySelector('[data-live="' + it.key + '"]');
        if (!el) {
          // A new job or round the page does not show yet (e.g. started automatically).
          if (!TERMINAL[it.state] && document.getElementById("live")) { reload = true; }
          return;
        }
        var bar = el.querySelector("progress");
        if (bar) {
          if (TERMINAL[it.state]) { bar.max = 1; bar.value = 1; }
          else if (it.total > 0) { bar.max = it.total; bar.value = it.done; }
          else { bar.removeAttribute("value"); }
        }
        var count = el.querySelector(".count");
        if (count) { count.textContent = it.count || ""; }
        var state = el.querySelector(".state");
        if (state) { state.textContent = it.state_label || it.state; state.className = "state " + it.state; }
        var label = el.querySelector(".label");
        if (label && it.text) { label.textContent = it.text; }
        if (TERMINAL[it.state] && !TERMINAL[el.getAttribute("data-state")]) { reload = true; }
        el.setAttribute("data-state", it.state);
      });
      if (reload) { source.close(); window.setTimeout(function () { window.location.reload(); }, 300); }
    };
  }

  // Upload progress: send file forms with XMLHttpRequest to show how much of the file is sent;
  // the server then streams it to the service as a background job with its own progress bar.
  Array.prototype.forEach.call(document.querySelectorAll("form.js-upload"), function (form) {
    form.addEventListener("submit", function (ev) {
      var files = form.querySelectorAll("input[type=file]");
      var any = Array.prototype.some.call(files, function (f) { return f.files && f.files.length; });
      if (!any || !window.FormData) { return; }
      ev.preventDefault();
      var data = new FormData(form);
      if (ev.submitter && ev.submitter.name) { data.append(ev.submitter.name, ev.submitter.value); }
      var box = form.querySelector(".upload-progress");
      var bar = box ? box.querySelector("progress") : null;
      var count = box ? box.querySelector(".count") : null;
      if (box) { box.hidden = false; }
      Array.prototype.forEach.call(form.querySelectorAll("button"), function (b) { b.disabled = true; });
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-Ftps-Upload", "1");
      xhr.upload.onprogress = function (e) {
        if (!e.lengthComputable || !bar) { return; }
        bar.max = e.total; bar.value = e.loaded;
        if (count) { count.textContent = Math.round(e.loaded / 1024) + " / " + Math.round(e.total / 1024) + " kB"; }
      };
      xhr.onload = function () {
        var next = null;
        if (xhr.status === 200 && /json/.test(xhr.getResponseHeader("Content-Type") || "")) {
          try { next = JSON.parse(xhr.responseText).location; } catch (e) { next = null; }
        }
        if (next) { window.location.href = next; return; }
        document.open(); document.write(xhr.responseText); document.close();  // a refusal page
      };
      xhr.onerror = function () { if (count) { count.textContent = "upload failed: the web server did not answer"; } };
      xhr.send(data);
    });
  });
})();
"""
