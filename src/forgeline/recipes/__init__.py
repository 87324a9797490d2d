"""One short module per training stage, each on the shared run set-up (setup.py): pretrain, sft, ..."""
