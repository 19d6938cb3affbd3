"""Pretraining data: text -> packed, memory-mapped token shards (with Fill-in-the-Middle), and their loaders.

On disk, one directory: `meta.json`, `tokenizer.json`, and `train_00000.bin`, ..., `heldout_00000.bin`, ...,
each a raw array of `meta["dtype"]` tokens (uint16 when the vocabulary fits, else uint32). A split's shards,
concatenated in order, are its token stream: documents packed back to back, each as bos ... eos.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.atomic import replace_directory
from nanoseek.data.tokenizer import TOKENIZER_FILE, Tokenizer
from nanoseek.errors import NanoseekError

META_FILE = "meta.json"
SPLITS = ("train", "heldout")
SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_ENCODE_BATCH = 1024  # documents per encode_batch call
_COUNT_CHUNK = 1 << 24  # tokens per bincount in unigram_entropy


class DataError(NanoseekError, ValueError):
    """Input data or a prepared directory that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------- writing
def prepare_documents(docs: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path, *, fim_rate: float = 0.1,
                      heldout_fraction: float = 0.01, seed: int = 0, shard_tokens: int = 50_000_000) -> dict:
    """Tokenize `docs` into `out_dir` (replaced atomically) and return its meta dict.

    Each document's fate is drawn from an RNG seeded by (seed, its index), so it does not depend on batching:
    held out with probability `heldout_fraction`; otherwise turned into FIM form (PSM: `<｜fim▁begin｜>prefix
    <｜fim▁hole｜>suffix<｜fim▁end｜>middle`, split at two uniform character positions) with probability
    `fim_rate`. Held-out documents stay plain text. Every document is bos ... eos; empty strings are skipped.
    With 0 < heldout_fraction < 1 neither split is left empty: if the draws leave one so, the other split's last
    document moves there.
    """
    if not 0 <= fim_rate <= 1 or not 0 <= heldout_fraction <= 1:
        raise DataError(f"fim_rate={fim_rate} and heldout_fraction={heldout_fraction} must lie in [0, 1]")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {split: _ShardWriter(staging, split, shard_tokens) for split in SPLITS}
    try:
        documents = dict.fromkeys(SPLITS, 0)
        fim_documents = 0

        def write(split: str, batch: list[_Document]) -> None:
            nonlocal fim_documents
            documents[split] += len(batch)
            fim_documents += sum(d.fim for d in batch)
            writers[split].write(np.fromiter(chain.from_iterable(d.tokens for d in batch), dtype))

        last: dict[str, _Document] = {}  # each split's latest document, written one behind (see _fill_both_splits)
        start_time = time.perf_counter()
        with tqdm(desc="tokenizing", unit="doc") as bar:
            for consumed, batch in _tokenize(docs, tokenizer, seed, fim_rate, heldout_fraction):
                for split in SPLITS:
                    mine = ([last.pop(split)] if split in last else []) + [d for d in batch if d.split == split]
                    if mine:
                        last[split] = mine.pop()
                    write(split, mine)
                bar.update(consumed)
                tokens = sum(w.tokens for w in writers.values())
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start_time):,.0f} tok/s", refresh=False)
        if not last:
            raise DataError("no documents to prepare (the input was empty)")
        for doc in _fill_both_splits(last, documents, heldout_fraction, tokenizer):
            write(doc.split, [doc])
        for writer in writers.values():
            writer.close()
        tokenizer.save(staging / TOKENIZER_FILE)
        meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "tokens": {split: w.tokens for split, w in writers.items()}, "documents": documents,
                "num_documents": sum(documents.values()), "fim_documents": fim_documents, "fim_rate": fim_rate,
                "heldout_fraction": heldout_fraction, "seed": seed, "shard_tokens": shard_tokens,
                "tokenizer": TOKENIZER_FILE}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_directory(staging, out_dir)
    except BaseException:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


class _Plan(NamedTuple):
    """One document's split and the text parts to encode: [doc], or [prefix, middle, suffix] for FIM."""

    split: str
    parts: list[str]


class _Document(NamedTuple):
    split: str
    fim: bool
    tokens: list[int]
    text: str


def _fill_both_splits(last: dict[str, _Document], written: dict[str, int], heldout_fraction: float,
                      tokenizer: Tokenizer) -> list[_Document]:
    """Each split's last document (held back so far) -> the documents to write last. With 0 < heldout_fraction
    < 1 both splits must hold a document: when the draws left one empty, the other's last document moves there
    (as plain text); a single document cannot make two splits, which is an error."""
    if not 0 < heldout_fraction < 1 or len(last) == len(SPLITS):
        return list(last.values())
    ((split, doc),) = last.items()
    if not written[split]:
        raise DataError(f"only 1 document, which cannot make both a train and a held-out split (--heldout-fraction "
                        f"{heldout_fraction}): give more documents (a .txt/.md file is one document, a .jsonl "
                        "line or a Parquet row is one), or pass --heldout-fraction 0 for no held-out split")
    other = next(s for s in SPLITS if s != split)
    tokens = doc.tokens if not doc.fim else _assemble([tokenizer.encode(doc.text)], tokenizer)
    return [_Document(other, False, tokens, doc.text)]


def _tokenize(docs: Iterable[str], tokenizer: Tokenizer, seed: int, fim_rate: float,
              heldout_fraction: float) -> Iterator[tuple[int, list[_Document]]]:
    """Batches of bos ... eos documents, each with the number of input documents it covers."""
    docs = iter(docs)
    index = 0
    while batch := list(islice(docs, _ENCODE_BATCH)):
        plans = [_plan(doc, seed, index + i, fim_rate, heldout_fraction) for i, doc in enumerate(batch)]
        plans = [p for p in plans if p.parts]
        index += len(batch)
        encoded = iter(tokenizer.encode_batch([part for p in plans for part in p.parts]))
        documents = []
        for p in plans:
            tokens = _assemble([next(encoded) for _ in p.parts], tokenizer)
            documents.append(_Document(p.split, len(p.parts) == 3, tokens, "".join(p.parts)))
        yield len(batch), documents


def _plan(doc: str, seed: int, index: int, fim_rate: float, heldout_fraction: float) -> _Plan:
    heldout_u, fim_u, *cuts = np.random.default_rng((seed, index)).random(4)
    if not doc:
        return _Plan("train", [])
    if heldout_u < heldout_fraction:
        return _Plan("heldout", [doc])
    if fim_u < fim_rate:
        a, b = sorted(int(u * (len(doc) + 1)) for u in cuts)
        return _Plan("train", [doc[:a], doc[a:b], doc[b:]])
    return _Plan("train", [doc])


def _assemble(parts: list[list[int]], tokenizer: Tokenizer) -> list[int]:
    """[doc] -> bos doc eos; [prefix, middle, suffix] -> PSM: bos fim_begin prefix fim_hole suffix fim_end middle eos.

    bos opens every document as it opens every prompt at inference, so a prompt looks like a document start.
    """
    if len(parts) == 1:
        return [tokenizer.bos_id] + parts[0] + [tokenizer.eos_id]
    prefix, middle, suffix = parts
    return ([tokenizer.bos_id, tokenizer.fim_begin_id] + prefix + [tokenizer.fim_hole_id] + suffix
            + [tokenizer.fim_end_id] + middle + [tokenizer.eos_id])


class _ShardWriter:
    """Appends tokens to `{split}_00000.bin`, `{split}_00001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.tokens = 0
        self._file = None
        self._room = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if not self._room:
                self._next_shard()
            n = min(len(tokens), self._room)
            tokens[:n].tofile(self._file)
            tokens, self._room, self.tokens = tokens[n:], self._room - n, self.tokens + n

    def _next_shard(self) -> None:
        self.close()
        self._file = open(self.directory / f"{self.split}_{self.tokens // self.shard_tokens:05d}.bin", "wb")
        self._room = self.shard_tokens

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------- reading files
def prepare_files(paths: Sequence[str | Path], tokenizer: Tokenizer, out_dir: str | Path, **kwargs: Any) -> dict:
    """`prepare_documents` over files: `.txt`/`.md` are one document per file, `.jsonl` one per line (its
    "text" field), `.parquet` one per row (its "text" column). Directories expand to the supported files
    inside them, recursively and sorted. Whitespace-only documents are dropped; a file with none left is an error.
    """
    return prepare_documents(read_documents(paths), tokenizer, out_dir, **kwargs)


def read_documents(paths: Sequence[str | Path]) -> Iterator[str]:
    """The documents of the given files and directories, read as `prepare_files` reads them."""
    return chain.from_iterable(map(_documents, _expand(paths)))


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
            files += found
        elif not path.exists():
            raise DataError(f"{path}: no such file")
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (supported: "
                            f"{', '.join(SUPPORTED_SUFFIXES)})")
        else:
            files.append(path)
    if not files:
        raise DataError("no input files given")
    return files


def _documents(path: Path) -> Iterator[str]:
    suffix = path.suffix.lower()
    reader = _read_jsonl if suffix == ".jsonl" else _read_parquet if suffix == ".parquet" else _read_text
    count = 0
    for doc in reader(path):
        if doc.strip():
            count += 1
            yield doc
    if not count:
        raise DataError(f"{path}: no documents ({'empty file' if path.stat().st_size == 0 else 'only whitespace'})")


def _decode(data: bytes, path: Path, offset: int = 0, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({where}byte offset {offset + e.start})") from None


def _read_text(path: Path) -> Iterator[str]:
    yield _decode(path.read_bytes(), path)


def _read_jsonl(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, offset, f"line {number}, ")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}: line {number} has no \"text\" string field")
            yield text


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    schema = file.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise DataError(f"{path}: the 'text' column holds {text_type}, not strings")
    for batch in file.iter_batches(columns=["text"]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


# ---------------------------------------------------------------------- reading prepared directories
def load_meta(directory: str | Path) -> dict:
    """The meta dict of a directory written by `prepare_documents`."""
    file = Path(directory) / META_FILE
    if not file.is_file():
        raise DataError(f"{directory}: no {META_FILE}; is it a directory written by prepare_documents?")
    return json.loads(file.read_text())


class _TokenStream:
    """A split's shards as one read-only sequence of tokens (memory-mapped)."""

    def __init__(self, directory: str | Path, split: str):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        directory = Path(directory)
        self.meta = load_meta(directory)
        dtype = np.dtype(self.meta["dtype"])
        files = sorted(directory.glob(f"{split}_*.bin"))
        expected = self.meta["tokens"][split]
        size = sum(f.stat().st_size for f in files)
        if size != expected * dtype.itemsize:
            raise DataError(f"{directory}: the {split} shards hold {size} bytes but {META_FILE} promises {expected} "
                            f"{dtype.name} tokens; the directory is incomplete or mixed")
        self.shards = [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.split = split
        self.directory = directory

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo = start - int(self.offsets[shard])
            n = min(stop - start, len(self.shards[shard]) - lo)
            parts.append(self.shards[shard][lo:lo + n])
            start += n
            shard += 1
        return np.concatenate(parts)

    def num_windows(self, seq_len: int) -> int:
        """How many (seq_len + 1)-token windows start at multiples of seq_len; an error if none fits."""
        if len(self) < seq_len + 1:
            more = "more data or a larger --heldout-fraction" if self.split == "heldout" else "more data"
            raise DataError(f"{self.directory}: the {self.split} split has {len(self)} tokens; seq_len={seq_len} "
                            f"needs at least {seq_len + 1}: prepare {more}, or use a shorter --seq-len")
        return (len(self) - 1) // seq_len

    def window_start(self, i: int, seq_len: int, align_token: int | None = None) -> int:
        """Where window i starts: i*seq_len, or with align_token the first such token in [i*seq_len,
        (i+1)*seq_len) (the window then opens on a document's bos), kept where none is or the window would
        overrun the stream."""
        start = i * seq_len
        if align_token is None:
            return start
        hits = np.flatnonzero(self.read(start, start + seq_len) == align_token)
        return min(start + int(hits[0]), len(self) - seq_len - 1) if len(hits) else start

    def windows(self, indices: Iterable[int], seq_len: int, align_token: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 (len(indices), seq_len): window i is the seq_len + 1 tokens from
        window_start(i)."""
        starts = [self.window_start(i, seq_len, align_token) for i in indices]
        rows = torch.from_numpy(np.stack([self.read(s, s + seq_len + 1) for s in starts]).astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TokenLoader:
    """Random (seq_len + 1)-token windows of a prepared split, each visited once per epoch.

    Window i holds tokens [i*seq_len, (i+1)*seq_len + 1) of the packed stream, so every token is a target
    once per epoch. Epoch e visits the windows in the order of a permutation seeded by seed + e. Each call
    takes the next batch_size * world_size windows of that order, rank r the r-th slice, so ranks are
    disjoint as long as every rank asks for the same batch size.
    """

    def __init__(self, directory: str | Path, split: str = "train", *, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, align_token: int | None = None):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.stream = _TokenStream(directory, split)
        self.num_windows = self.stream.num_windows(seq_len)
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self.align_token = align_token
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 (batch_size, seq_len), targets = inputs shifted left by one token."""
        windows = self._take(batch_size * self.world_size)
        return self.stream.windows(windows[self.rank * batch_size:(self.rank + 1) * batch_size], self.seq_len,
                                   self.align_token)

    def _take(self, n: int) -> np.ndarray:
        taken = []
        while n:
            if self._order_epoch != self.epoch:
                self._order = np.random.default_rng(self.seed + self.epoch).permutation(self.num_windows)
                self._order_epoch = self.epoch
            k = min(n, self.num_windows - self.cursor)
            taken.append(self._order[self.cursor:self.cursor + k])
            self.cursor, n = self.cursor + k, n - k
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return np.concatenate(taken)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "num_windows"):
            if state[key] != getattr(self, key):
                raise DataError(f"the checkpoint's data position has {key}={state[key]} but this loader has "
                                f"{getattr(self, key)}: resume with the data and options the run started with")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def heldout_batches(directory: str | Path, seq_len: int, batch_size: int,
                    max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out split's windows in order, `batch_size` at a time (the last batch may be smaller)."""
    stream = _TokenStream(directory, "heldout")
    num_windows = stream.num_windows(seq_len)
    starts = range(0, num_windows, batch_size)
    for start in starts if max_batches is None else starts[:max_batches]:
        yield stream.windows(range(start, min(start + batch_size, num_windows)), seq_len)


def unigram_entropy(directory: str | Path, split: str = "train") -> float:
    """Cross-entropy (nats/token) on `split` of the train split's unigram model, add-one smoothed: the loss a
    model that ignores context would reach."""
    vocab_size = load_meta(directory)["vocab_size"]
    train = _token_counts(_TokenStream(directory, "train"), vocab_size)
    counts = train if split == "train" else _token_counts(_TokenStream(directory, split), vocab_size)
    if not counts.sum():
        raise DataError(f"{directory}: the {split} split has no tokens")
    log_p = np.log((train + 1) / (train.sum() + vocab_size))
    return float(-(counts * log_p).sum() / counts.sum())


def _token_counts(stream: _TokenStream, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in stream.shards:
        for start in range(0, len(shard), _COUNT_CHUNK):
            chunk = np.bincount(shard[start:start + _COUNT_CHUNK], minlength=vocab_size)
            if len(chunk) > vocab_size:
                raise DataError(f"{stream.directory}: the {stream.split} split holds token id {len(chunk) - 1}, "
                                f"beyond vocab_size={vocab_size}")
            counts += chunk
    return counts
