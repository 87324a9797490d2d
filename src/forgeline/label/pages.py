"""The annotation pages: Jinja2 templates (autoescaped: prompts and model outputs are untrusted), their stylesheet
and script. Everything is served by the app itself; the pages load nothing from elsewhere and work offline.

The script only sends answers and handles keys: the server renders every item, and the Content-Security-Policy the
app sends forbids inline scripts, so even text that escaped escaping could not run. Each text starts on the line
after its <pre>: HTML drops one newline right after <pre>, and it must be that one, not the text's own.
"""

from __future__ import annotations

import jinja2

_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} - forgeline label</title>
<link rel="stylesheet" href="/static/label.css">
</head>
<body>
{% block body %}{% endblock %}
</body>
</html>
"""

_LOGIN = """{% extends "base.html" %}
{% block title %}log in{% endblock %}
{% block body %}
<main class="login">
<h1>forgeline label</h1>
<form method="post" action="/login">
<label for="token">Access token</label>
<input type="password" name="token" id="token" autocomplete="off" autofocus required>
<button type="submit" id="login">Log in</button>
</form>
{% if error %}<p class="error" id="login-error">{{ error }}</p>{% endif %}
</main>
{% endblock %}
"""

_LABEL = """{% extends "base.html" %}
{% block title %}{{ project }}{% endblock %}
{% block body %}
<header class="bar">
<span class="project">{{ project }}</span>
<span class="progress" id="progress">{{ done }} / {{ total }} labelled</span>
<span class="who">{{ annotator }}</span>
<form method="post" action="/logout" class="logout"><button type="submit">log out</button></form>
</header>
<main>
{% if item %}
<section class="prompt" id="prompt">
<h2>Prompt</h2>
{% if item.prompt is string %}
<pre class="text">
{{ item.prompt }}</pre>
{% else %}
{% for message in item.prompt %}
<div class="message"><span class="role">{{ message.role }}</span><pre class="text">
{{ message.content }}</pre></div>
{% endfor %}
{% endif %}
</section>
<form id="answer" data-item="{{ item.id }}" data-mode="{{ item.mode }}" data-labels="{{ item.labels|join(',') }}">
<div class="responses n{{ item.labels|length if item.labels|length <= 4 else 'many' }}">
{% for label, text in zip(item.labels, item.texts) %}
<article class="response" id="response-{{ label }}" data-label="{{ label }}">
<h3>Response {{ label }} <span class="rank-badge" id="rank-{{ label }}"></span></h3>
<pre class="text">
{{ text }}</pre>
{% if item.mode == "ranking" %}
<button type="button" class="rank" data-label="{{ label }}">rank next <kbd>{{ loop.index if loop.index < 10 else label|lower }}</kbd></button>
{% endif %}
</article>
{% endfor %}
</div>
<div class="controls">
{% if item.mode == "choice" %}
<div class="choices">
<button type="button" class="choice" data-choice="A" id="choose-A">A is better <kbd>1</kbd> <kbd>a</kbd></button>
<button type="button" class="choice" data-choice="B" id="choose-B">B is better <kbd>2</kbd> <kbd>b</kbd></button>
<button type="button" class="choice" data-choice="tie" id="choose-tie">Tie <kbd>t</kbd></button>
<button type="button" class="choice" data-choice="both_bad" id="choose-both_bad">Both bad <kbd>x</kbd></button>
</div>
{% else %}
<p class="hint">Rank all {{ item.labels|length }} responses: click them (or press their keys) best first;
<kbd>Backspace</kbd> takes the last one back.</p>
<p>Ranking: <span id="ranking" class="ranking">none yet</span>
<button type="button" id="reset-ranking">reset</button></p>
{% endif %}
<label for="comment">Comment (optional)</label>
<textarea id="comment" maxlength="{{ max_comment }}" rows="2"></textarea>
<div class="submit-row">
<button type="submit" id="submit">Submit <kbd>Enter</kbd></button>
<span id="status" role="status"></span>
</div>
<p class="hint">In the comment box, <kbd>Ctrl</kbd>+<kbd>Enter</kbd> submits and <kbd>Esc</kbd> leaves the box.</p>
</div>
</form>
<noscript><p class="error">This page needs JavaScript to send answers.</p></noscript>
{% else %}
<p class="done" id="all-done">All {{ total }} items are labelled. Thank you!</p>
{% endif %}
</main>
<script src="/static/label.js"></script>
{% endblock %}
"""

CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: #1d2330; background: #f4f5f7; }
main { padding: 1rem 1.5rem 2rem; }
.bar { display: flex; gap: 1.5rem; align-items: center; padding: .6rem 1.5rem; background: #1d2330; color: #fff; }
.bar .project { font-weight: 600; }
.bar .progress { margin-left: auto; }
.bar .logout { margin: 0; }
.bar .logout button { background: none; border: 1px solid #8891a5; color: #fff; }
h2, h3 { margin: 0 0 .4rem; font-size: 1rem; }
pre.text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font: 14px/1.45 ui-monospace, monospace;
           max-height: 55vh; overflow: auto; }
.prompt, .response { background: #fff; border: 1px solid #d5d9e0; border-radius: 6px; padding: .8rem 1rem; }
.prompt { margin-bottom: 1rem; }
.message { margin-bottom: .5rem; }
.message .role { font-size: .8rem; text-transform: uppercase; color: #5b6478; }
.responses { display: grid; gap: 1rem; grid-template-columns: repeat(2, minmax(0, 1fr)); }
.responses.n3 { grid-template-columns: repeat(3, minmax(0, 1fr)); }
.responses.n4 { grid-template-columns: repeat(2, minmax(0, 1fr)); }
.responses.nmany { grid-template-columns: repeat(auto-fill, minmax(22rem, 1fr)); }
.response.chosen { border: 2px solid #1f7a3d; }
.response.rejected { opacity: .75; }
.rank-badge { float: right; color: #1f7a3d; font-weight: 600; }
.controls { margin-top: 1rem; }
.choices { display: flex; flex-wrap: wrap; gap: .5rem; margin-bottom: .8rem; }
button { font: inherit; padding: .35rem .8rem; border: 1px solid #8891a5; border-radius: 5px; background: #fff;
         cursor: pointer; }
button.selected { background: #1f7a3d; border-color: #1f7a3d; color: #fff; }
button:disabled { opacity: .5; cursor: wait; }
#submit { background: #1d2330; color: #fff; }
textarea { display: block; width: 100%; margin: .3rem 0 .6rem; font: inherit; }
kbd { font: 12px ui-monospace, monospace; border: 1px solid #aab; border-radius: 3px; padding: 0 .25rem;
      background: #f4f5f7; color: #1d2330; }
.submit-row { display: flex; align-items: center; gap: 1rem; }
.hint { color: #5b6478; font-size: .9rem; }
.error, #status.error { color: #a4161a; }
.done { font-size: 1.2rem; }
.login { max-width: 24rem; margin: 4rem auto; background: #fff; padding: 1.5rem; border-radius: 6px;
         border: 1px solid #d5d9e0; }
.login input { display: block; width: 100%; margin: .3rem 0 .8rem; font: inherit; padding: .35rem; }
@media (max-width: 800px) { .responses, .responses.n3, .responses.n4 { grid-template-columns: 1fr; } }
"""

# Keys: 1/a and 2/b choose A/B, t tie, x both bad (two responses); digits or letters rank (three or more, and
# Backspace undoes); Enter submits. Keys typed into the comment box stay text, except Ctrl/Cmd+Enter and Escape.
JS = r"""
(function () {
  "use strict";
  var form = document.getElementById("answer");
  if (!form) { return; }
  var item = Number(form.dataset.item);
  var mode = form.dataset.mode;
  var labels = form.dataset.labels.split(",");
  var comment = document.getElementById("comment");
  var status = document.getElementById("status");
  var submitButton = document.getElementById("submit");
  var choice = null;
  var ranking = [];
  var sending = false;

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  function show() {
    if (mode === "choice") {
      document.querySelectorAll("button.choice").forEach(function (b) {
        b.classList.toggle("selected", b.dataset.choice === choice);
      });
      labels.forEach(function (label) {
        var card = document.getElementById("response-" + label);
        card.classList.toggle("chosen", choice === label);
        card.classList.toggle("rejected", (choice === "A" || choice === "B") && choice !== label);
      });
    } else {
      labels.forEach(function (label) {
        var place = ranking.indexOf(label);
        document.getElementById("rank-" + label).textContent = place < 0 ? "" : "#" + (place + 1);
      });
      document.getElementById("ranking").textContent = ranking.length ? ranking.join(" > ") : "none yet";
    }
    say("", false);
  }

  function choose(value) {
    choice = value;
    show();
  }

  function rankNext(label) {
    if (ranking.indexOf(label) >= 0) { return; }
    ranking.push(label);
    if (ranking.length === labels.length - 1) {  // the last one has only one place left
      labels.forEach(function (l) { if (ranking.indexOf(l) < 0) { ranking.push(l); } });
    }
    show();
  }

  function undoRank() {
    ranking.pop();
    show();
  }

  function submit() {
    if (sending) { return; }
    var body = {item: item, comment: comment.value};
    if (mode === "choice") {
      if (choice === null) { say("Choose A, B, tie or both bad first.", true); return; }
      body.choice = choice;
    } else {
      if (ranking.length !== labels.length) { say("Rank every response first.", true); return; }
      body.ranking = ranking;
    }
    sending = true;
    submitButton.disabled = true;
    say("Saving...", false);
    fetch("/api/answer", {
      method: "POST",
      credentials: "same-origin",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body)
    }).then(function (response) {
      // 409: this item was already answered (another tab): the next page shows the next item all the same
      if (response.ok || response.status === 409) {
        window.location.replace("/");
        return null;
      }
      return response.json().catch(function () { return {}; }).then(function (data) {
        var detail = data && data.detail;
        say("Not saved: " + (typeof detail === "string" ? detail : "error " + response.status), true);
        sending = false;
        submitButton.disabled = false;
      });
    }).catch(function () {
      say("Not saved: the server cannot be reached. Try again.", true);
      sending = false;
      submitButton.disabled = false;
    });
  }

  document.querySelectorAll("button.choice").forEach(function (b) {
    b.addEventListener("click", function () { choose(b.dataset.choice); });
  });
  document.querySelectorAll("button.rank").forEach(function (b) {
    b.addEventListener("click", function () { rankNext(b.dataset.label); });
  });
  var reset = document.getElementById("reset-ranking");
  if (reset) { reset.addEventListener("click", function () { ranking = []; show(); }); }
  form.addEventListener("submit", function (event) { event.preventDefault(); submit(); });

  document.addEventListener("keydown", function (event) {
    var typing = event.target === comment;
    if (typing) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); submit(); }
      else if (event.key === "Escape") { comment.blur(); }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var key = event.key.toLowerCase();
    if (key === "enter") { event.preventDefault(); submit(); return; }
    if (mode === "choice") {
      var chosen = {"1": "A", "a": "A", "2": "B", "b": "B", "t": "tie", "x": "both_bad"}[key];
      if (chosen) { event.preventDefault(); choose(chosen); }
      return;
    }
    if (key === "backspace") { event.preventDefault(); undoRank(); return; }
    var index = /^[1-9]$/.test(key) ? Number(key) - 1 : (/^[a-z]$/.test(key) ? key.charCodeAt(0) - 97 : -1);
    if (index >= 0 && index < labels.length) { event.preventDefault(); rankNext(labels[index]); }
  });
  show();
})();
"""

_environment = jinja2.Environment(
    loader=jinja2.DictLoader({"base.html": _BASE, "login.html": _LOGIN, "label.html": _LABEL}),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_environment.globals["zip"] = zip


def render(template: str, **context) -> str:
    return _environment.get_template(template).render(**context)
