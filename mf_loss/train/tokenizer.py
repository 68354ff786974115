"""A character tokenizer over a text corpus: id 0 is padding, id 1 stands for unknown characters."""
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_CORPUS = DATA_DIR / "corpus.txt"
PAD, UNK = "<pad>", "<unk>"


def corpus_path(name: str) -> Path:
    """`builtin` is the corpus shipped in mf_loss/data; anything else is a path to a UTF-8 text file."""
    return BUILTIN_CORPUS if name == "builtin" else Path(name)


def read_corpus(name: str) -> str:
    path = corpus_path(name)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"cannot read the training corpus {path}: {error.strerror}") from None


class CharTokenizer:
    """Ids: 0 = <pad>, 1 = <unk>, then the characters of the corpus in code-point order."""

    def __init__(self, characters):
        self.itos = [PAD, UNK] + sorted(set(characters))
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.pad_id, self.unk_id = 0, 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> np.ndarray:
        return np.fromiter((self.stoi.get(ch, self.unk_id) for ch in text), dtype=np.int32, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.itos[i] if 1 < i < len(self.itos) else "" for i in np.asarray(ids).tolist())
