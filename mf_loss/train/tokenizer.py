"""The training text as token ids: a byte-level BPE tokenizer (HF `tokenizers`) trained on the corpus, cached.

The tokenizer and the corpus's ids are built once per (corpus bytes, settings) and kept in a cache
directory named by a hash of both; later runs, and every rank of a run, only load them. The launcher
process (or the single process) prepares the cache before any rank starts; should a rank still find it
missing (a node whose launcher did not prepare it), an exclusive file lock makes one process build it while
the others wait, and the build is written to a temporary directory and renamed into place (atomic: a
reader never sees half a cache).
"""
import fcntl
import hashlib
import json
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_CORPUS = DATA_DIR / "kjv.txt.xz"
PAD = "<pad>"
CACHE_ENV = "MF_LOSS_CACHE"
FORMAT_VERSION = 1  # part of the cache key: bump when the way the cache is built changes


def corpus_path(name: str) -> Path:
    """`builtin` is the King James Bible shipped in mf_loss/data; anything else a UTF-8 text file (.xz is
    decompressed)."""
    return BUILTIN_CORPUS if name == "builtin" else Path(name)


def read_corpus(name: str) -> str:
    path = corpus_path(name)
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"cannot read the training corpus {path}: {error.strerror}") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mf_loss") / "tokenizers"


@dataclass(frozen=True)
class TokenizerSettings:
    # BPE merges stop at this size (id 0 is <pad>), or earlier when the corpus has no pair left to merge
    # (the King James Bible stops near 15k): the model's ids above the tokenizer's are then never used.
    vocab_size: int = 8192
    min_frequency: int = 2

    def as_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "min_frequency": self.min_frequency, "format": FORMAT_VERSION}


@dataclass
class TokenizedCorpus:
    tokenizer: object        # tokenizers.Tokenizer
    ids: np.ndarray          # the whole corpus, int32
    pad_id: int
    directory: Path
    built: bool              # True when this call built the cache, False when it loaded it

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).ravel()])


def cache_key(corpus_bytes: bytes, settings: TokenizerSettings) -> str:
    digest = hashlib.sha256(corpus_bytes)
    digest.update(json.dumps(settings.as_dict(), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _train(text: str, settings: TokenizerSettings):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    # Byte-level BPE (GPT-2 / Llama-3 style): every string encodes, nothing maps to an unknown token.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings.vocab_size, min_frequency=settings.min_frequency,
                                  special_tokens=[PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = text.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer)
    ids = np.fromiter((i for encoding in tokenizer.encode_batch(lines) for i in encoding.ids), np.int32)
    return tokenizer, ids


def _load(directory: Path, built: bool) -> TokenizedCorpus:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return TokenizedCorpus(tokenizer, np.load(directory / "ids.npy"), tokenizer.token_to_id(PAD), directory, built)


def prepare_corpus(corpus: str = "builtin", settings: TokenizerSettings = TokenizerSettings(),
                   cache_dir=None) -> TokenizedCorpus:
    """The tokenizer and token ids of `corpus`, from the cache, built there first when missing."""
    path = corpus_path(corpus)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise FileNotFoundError(f"cannot read the training corpus {path}: {error.strerror}") from None
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    directory = root / cache_key(raw, settings)
    if (directory / "ids.npy").exists():
        return _load(directory, built=False)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / "ids.npy").exists():  # another process built it while this one waited
            return _load(directory, built=False)
        tokenizer, ids = _train(read_corpus(corpus), settings)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=root))
        try:
            tokenizer.save(str(staging / "tokenizer.json"))
            np.save(staging / "ids.npy", ids)
            (staging / "settings.json").write_text(json.dumps(
                {**settings.as_dict(), "corpus": str(path), "corpus_bytes": len(raw), "tokens": int(ids.size)},
                indent=1) + "\n")
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _load(directory, built=True)
