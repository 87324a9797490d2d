import os
from pathlib import Path

import pytest

# Tests run many small torch ops; spinning OpenMP threads fight each other on 2 cores (see shared/notes/machine.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FORGELINE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data sets beside the checkout (../shared/data); tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only CI and developer machines have ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def story_dataset(tmp_path_factory):
    """A small real token-shard dataset (generated stories, BPE tokenizer) shared by the training tests."""
    from forgeline.data import prepare_dataset
    from forgeline.recipes.demo import write_corpus
    from forgeline.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("stories")
    corpus = write_corpus(root / "stories.txt", n_stories=1500, seed=1)
    tokenizer = train_bpe([corpus], vocab_size=512, output_dir=root / "tokenizer", show_progress=False)
    prepare_dataset([corpus], tokenizer=tokenizer, output_dir=root / "data", val_fraction=0.05, show_progress=False)
    return root / "data"
