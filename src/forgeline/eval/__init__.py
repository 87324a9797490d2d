"""Evaluation: a request engine over the inference package (log-likelihoods of continuations, generation until stop
strings), benchmark tasks (data + a small scorer), the HumanEval code sandbox, contamination checks and reports."""
