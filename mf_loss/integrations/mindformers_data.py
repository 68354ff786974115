"""The project's corpus as a MindRecord that MindFormers' own loader reads (`MindDataset` under
`CausalLanguageModelDataset`), tokenized with the project's tokenizer; built on first use and cached.

    python -m mf_loss.integrations.mindformers_data --config configs/mindformers_trainer.yaml

builds (or finds) the file a YAML's `corpus_mindrecord` block describes and prints its path: what
`run_mindformer.py --train_dataset_dir` takes. Rows are consecutive windows of seq_length + 1 tokens (no padding);
columns `input_ids`, `labels` (input_ids, with a fraction `ignored_fraction` of them set to `ignore_index`) and
`loss_mask` (ones). Cache: <MF_LOSS_CACHE or ~/.cache/mf_loss>/mindrecord/<key>/corpus.mindrecord, the key a hash
of the tokenizer's cache key and the block; built under an exclusive lock into a temporary directory and renamed
into place, so ranks starting together build it once and never read half a file.
"""
import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FILE_NAME = "corpus.mindrecord"
BLOCK = "corpus_mindrecord"
FORMAT_VERSION = 1  # part of the cache key: bump when the way the file is built changes


@dataclass(frozen=True)
class CorpusRecordSettings:
    corpus: str = "builtin"            # `builtin` (mf_loss/data/kjv.txt.xz) or a UTF-8 text file
    tokenizer_vocab_size: int = 8192   # the project's byte-level BPE (mf_loss.train.tokenizer), cached on its own
    seq_length: int = 64               # each row holds seq_length + 1 tokens: the model predicts [1:] from [:-1]
    rows: int = 512                    # how many windows, from the corpus's start
    ignored_fraction: float = 0.0      # labels set to ignore_index (loss_mask stays 1 there)
    ignore_index: int = -100
    seed: int = 0                      # which labels are ignored

    @classmethod
    def from_block(cls, block, source: str) -> "CorpusRecordSettings":
        from ..config_loader import ConfigError
        block = dict(block or {})
        known = set(asdict(cls()))
        unknown = sorted(set(block) - known)
        if unknown:
            raise ConfigError(f"{source}: {BLOCK}: unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        settings = cls(**block)
        if settings.seq_length < 1 or settings.rows < 1 or not 0.0 <= settings.ignored_fraction <= 1.0:
            raise ConfigError(f"{source}: {BLOCK}: seq_length and rows must be >= 1 and ignored_fraction in [0, 1], "
                              f"got {block}")
        return settings


def default_cache_dir() -> Path:
    from ..train.tokenizer import default_cache_dir as tokenizer_cache_dir
    return tokenizer_cache_dir().parent / "mindrecord"


def record_rows(settings: CorpusRecordSettings):
    """(input_ids, labels, loss_mask), each (rows, seq_length + 1): the tokenized corpus's first windows."""
    from ..train.tokenizer import TokenizerSettings, prepare_corpus
    corpus = prepare_corpus(settings.corpus, TokenizerSettings(vocab_size=settings.tokenizer_vocab_size))
    length = settings.seq_length + 1
    if corpus.ids.size < settings.rows * length:
        raise ValueError(f"{BLOCK}: the corpus {settings.corpus!r} has {corpus.ids.size} tokens, fewer than rows x "
                         f"(seq_length + 1) = {settings.rows} x {length}")
    input_ids = corpus.ids[:settings.rows * length].reshape(settings.rows, length).astype(np.int32)
    labels = input_ids.copy()
    ignored = np.random.default_rng(settings.seed).random(labels.shape) < settings.ignored_fraction
    labels[ignored] = settings.ignore_index
    return input_ids, labels, np.ones(input_ids.shape, np.int32), corpus.directory.name


def corpus_mindrecord(settings: CorpusRecordSettings = CorpusRecordSettings(), cache_dir=None) -> Path:
    """The MindRecord file of `settings`, from the cache, built there first when missing."""
    from ..train.tokenizer import TokenizerSettings, cache_key, corpus_path
    raw = corpus_path(settings.corpus).read_bytes()
    digest = hashlib.sha256(cache_key(raw, TokenizerSettings(vocab_size=settings.tokenizer_vocab_size)).encode())
    digest.update(json.dumps({**asdict(settings), "format": FORMAT_VERSION}, sort_keys=True).encode())
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    directory = root / digest.hexdigest()[:24]
    path = directory / FILE_NAME
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():  # another process built it while this one waited
            return path
        input_ids, labels, loss_mask, tokenizer_key = record_rows(settings)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=root))
        try:
            write_mindrecord(staging / FILE_NAME, input_ids, labels, loss_mask)
            (staging / "settings.json").write_text(json.dumps(
                {**asdict(settings), "format": FORMAT_VERSION, "tokenizer_cache": tokenizer_key}, indent=1) + "\n")
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def write_mindrecord(path: Path, input_ids, labels, loss_mask) -> None:
    """One MindRecord file of int32 rows: columns input_ids, labels, loss_mask."""
    from mindspore.mindrecord import FileWriter
    length = input_ids.shape[1]
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({name: {"type": "int32", "shape": [length]} for name in ("input_ids", "labels", "loss_mask")},
                      "corpus")
    writer.write_raw_data([{"input_ids": a, "labels": b, "loss_mask": c}
                           for a, b, c in zip(input_ids, labels, loss_mask)])
    writer.commit()


def settings_of(tree: dict, source: str) -> CorpusRecordSettings:
    """The `corpus_mindrecord` block of a YAML tree (a mapping)."""
    return CorpusRecordSettings.from_block(tree.get(BLOCK), source)


def main(argv=None) -> int:
    import yaml
    parser = argparse.ArgumentParser(prog="python -m mf_loss.integrations.mindformers_data",
                                     description="Build (or find) a YAML's corpus MindRecord; print its path.")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    tree = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    print(corpus_mindrecord(settings_of(tree, args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
