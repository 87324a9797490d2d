"""Human comparison labels: a project of prompts with two or more model responses each, annotators who pick the
better one (or rank them) in a small local web app, and an export of their answers as preference pairs with an
agreement and win-rate report. See docs/label.md.

    store.py   the SQLite database (schema, durable transactions, tokens)
    create.py  reading prompts or candidates, generating the responses
    app.py     the web app and its JSON API (FastAPI: the optional `label` extra), pages.py its HTML
    serve.py   running it on uvicorn
    stats.py   Cohen's kappa, Krippendorff's alpha, Wilson intervals, win rates
    export.py  preference JSONL and the report
"""
