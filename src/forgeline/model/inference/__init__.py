"""Running a model: batched KV-cache generation and sampling (`generate`), scoring text (`scoring`), a reward
model's rewards for token sequences (`reward`).

Import from the modules themselves: re-exporting the function `generate` here would hide the module of that name.
"""
