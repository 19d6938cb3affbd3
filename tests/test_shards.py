"""Token shards: packing, FIM, the held-out split, shard and dtype layout, atomic writes, file readers and
their errors, TokenLoader (order, epochs, resume, ranks), held-out batches, and the unigram baseline."""

import json
import math
import random
import sys

import numpy as np
import pytest
import torch

from nanoseek.data.shards import (DataError, TokenLoader, heldout_batches, prepare_documents, prepare_files,
                                  unigram_entropy)
from nanoseek.data.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WORDS = ["alpha", "beta", "gamma", "über", "日本", "x", "=", "(", ")", ",", ".", "\n", "  "]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct documents (each starts with its index) with unicode, digits and newlines."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(1000))
                                    for _ in range(rng.randrange(3, 40))) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_docs(300, seed=1), vocab_size=400)


def stream(directory, split="train") -> list[int]:
    """A split's tokens, read independently of the loaders: its shard files in name order, concatenated."""
    dtype = json.loads((directory / "meta.json").read_text())["dtype"]
    files = sorted(directory.glob(f"{split}_*.bin"))
    return np.concatenate([np.fromfile(f, dtype=dtype) for f in files] or [np.empty(0, dtype)]).tolist()


def documents(tokens: list[int], eos_id: int, bos_id: int = 0) -> list[list[int]]:
    """Split a packed stream after each eos (which must end it); each document must open with bos (dropped)."""
    assert tokens and tokens[-1] == eos_id
    docs, current = [], []
    for t in tokens:
        if t == eos_id:
            assert current[0] == bos_id
            docs.append(current[1:])
            current = []
        else:
            current.append(t)
    return docs


def write_dataset(directory, splits: dict[str, list[np.ndarray]], vocab_size: int, dtype: str = "uint32"):
    """A prepared directory written by hand: each split given as its list of shards."""
    directory.mkdir()
    for split, shards in splits.items():
        for i, shard in enumerate(shards):
            np.asarray(shard, dtype=dtype).tofile(directory / f"{split}_{i:05d}.bin")
    tokens = {split: sum(len(s) for s in splits.get(split, [])) for split in ("train", "heldout")}
    (directory / "meta.json").write_text(json.dumps({"dtype": dtype, "vocab_size": vocab_size, "tokens": tokens}))
    return directory


# ---------------------------------------------------------------------- prepare_documents
def test_packing_is_bos_documents_with_eos_separators(tok, tmp_path):
    docs = make_docs(50)
    meta = prepare_documents(docs, tok, tmp_path / "ds", fim_rate=0, heldout_fraction=0)
    tokens = stream(tmp_path / "ds")
    assert tokens == [t for d in docs for t in tok.encode(d, bos=True, eos=True)]
    assert tok.decode(tokens) == "".join(BOS + d + EOS for d in docs)
    assert meta["tokens"] == {"train": len(tokens), "heldout": 0}
    assert meta["num_documents"] == 50 and meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id == 1
    assert json.loads((tmp_path / "ds" / "meta.json").read_text()) == meta
    assert Tokenizer.load(tmp_path / "ds").encode(docs[0]) == tok.encode(docs[0])
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "tokenizer.json", "train_00000.bin"]


def test_empty_strings_are_skipped(tok, tmp_path):
    prepare_documents(["a", "", "b"], tok, tmp_path / "ds", fim_rate=0, heldout_fraction=0)
    assert tok.decode(stream(tmp_path / "ds")) == BOS + "a" + EOS + BOS + "b" + EOS
    with pytest.raises(DataError, match="no documents"):
        prepare_documents(["", ""], tok, tmp_path / "none")


def test_shards_split_the_stream(tok, tmp_path):
    docs = make_docs(40)
    prepare_documents(docs, tok, tmp_path / "one", fim_rate=0, heldout_fraction=0)
    meta = prepare_documents(docs, tok, tmp_path / "many", fim_rate=0, heldout_fraction=0, shard_tokens=100)
    sizes = [f.stat().st_size // 2 for f in sorted((tmp_path / "many").glob("train_*.bin"))]
    assert len(sizes) == math.ceil(meta["tokens"]["train"] / 100) > 3
    assert sizes[:-1] == [100] * (len(sizes) - 1) and 0 < sizes[-1] <= 100
    assert stream(tmp_path / "many") == stream(tmp_path / "one")


class _SizedTokenizer(Tokenizer):
    """A tokenizer that reports another vocabulary size (to pick the shard dtype without a huge vocabulary)."""

    reported_vocab_size = 0

    @property
    def vocab_size(self) -> int:
        return self.reported_vocab_size


@pytest.mark.parametrize("vocab_size, dtype, itemsize", [(65536, "uint16", 2), (65537, "uint32", 4)])
def test_dtype_follows_vocab_size(tok, tmp_path, vocab_size, dtype, itemsize):
    sized = _SizedTokenizer.load(tok.save(tmp_path / "tok.json"))
    sized.reported_vocab_size = vocab_size
    docs = make_docs(5)
    meta = prepare_documents(docs, sized, tmp_path / "ds", fim_rate=0, heldout_fraction=0)
    assert meta["dtype"] == dtype and meta["vocab_size"] == vocab_size
    assert (tmp_path / "ds" / "train_00000.bin").stat().st_size == itemsize * meta["tokens"]["train"]
    assert stream(tmp_path / "ds") == [t for d in docs for t in tok.encode(d, bos=True, eos=True)]


def test_fim_moves_the_middle_to_the_end(tok, tmp_path):
    docs = make_docs(60)
    meta = prepare_documents(docs, tok, tmp_path / "ds", fim_rate=1.0, heldout_fraction=0)
    assert meta["fim_documents"] == 60
    middles = 0
    for doc, ids in zip(docs, documents(stream(tmp_path / "ds"), tok.eos_id), strict=True):
        assert ids[0] == tok.fim_begin_id
        assert ids.count(tok.fim_hole_id) == ids.count(tok.fim_end_id) == 1
        hole, end = ids.index(tok.fim_hole_id), ids.index(tok.fim_end_id)
        assert hole < end
        prefix, suffix, middle = ids[1:hole], ids[hole + 1:end], ids[end + 1:]
        assert tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix) == doc
        assert prefix == tok.encode(tok.decode(prefix)) and middle == tok.encode(tok.decode(middle))
        middles += bool(middle)
    assert middles > 50  # the split points are random, not degenerate


def test_fim_rate_is_a_fraction_of_documents(tok, tmp_path):
    docs = make_docs(400)
    meta = prepare_documents(docs, tok, tmp_path / "ds", fim_rate=0.5, heldout_fraction=0)
    fim = sum(ids[0] == tok.fim_begin_id for ids in documents(stream(tmp_path / "ds"), tok.eos_id))
    assert fim == meta["fim_documents"]
    assert abs(fim - 200) < 4 * math.sqrt(400 * 0.25)


def heldout_texts(tok, directory) -> list[str]:
    return [tok.decode(ids) for ids in documents(stream(directory, "heldout"), tok.eos_id)]


def test_heldout_split_is_a_seeded_fraction(tok, tmp_path):
    docs = make_docs(2000)
    meta = prepare_documents(docs, tok, tmp_path / "a", fim_rate=0, heldout_fraction=0.1, seed=3)
    held = heldout_texts(tok, tmp_path / "a")
    train = [tok.decode(ids) for ids in documents(stream(tmp_path / "a"), tok.eos_id)]
    assert abs(len(held) - 200) < 4 * math.sqrt(2000 * 0.09)
    assert meta["documents"] == {"train": len(train), "heldout": len(held)}
    assert sorted(held + train) == sorted(docs)  # a partition, each split in document order
    held_set = set(held)
    assert held == [d for d in docs if d in held_set] and train == [d for d in docs if d not in held_set]
    # deterministic, decided per document index (not per batch), and changed by the seed
    prepare_documents(docs, tok, tmp_path / "b", fim_rate=0, heldout_fraction=0.1, seed=3)
    assert stream(tmp_path / "b", "heldout") == stream(tmp_path / "a", "heldout")
    prepare_documents(docs[:700], tok, tmp_path / "prefix", fim_rate=0, heldout_fraction=0.1, seed=3)
    first_700 = set(docs[:700])
    assert heldout_texts(tok, tmp_path / "prefix") == [d for d in held if d in first_700]
    prepare_documents(docs, tok, tmp_path / "c", fim_rate=0, heldout_fraction=0.1, seed=4)
    assert heldout_texts(tok, tmp_path / "c") != held


def test_a_failed_prepare_leaves_no_trace(tok, tmp_path):
    prepare_documents(["old"], tok, tmp_path / "ds", fim_rate=0, heldout_fraction=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}

    def crashing():
        yield from make_docs(1500)
        raise RuntimeError("disk on fire")

    for target in ("ds", "new"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            prepare_documents(crashing(), tok, tmp_path / target, shard_tokens=500)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---------------------------------------------------------------------- prepare_files
def test_files_of_every_kind_and_directories(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("text file\n\nwith a blank line\n")
    (src / "a.jsonl").write_text('{"text": "line one", "id": 1}\n\n{"text": "line 2 ü"}\n')
    (src / "sub" / "c.md").write_text("# markdown 7\n")
    (src / "notes.csv").write_text("ignored,in,directories\n")
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["row a", None, "row c"]}), src / "d.parquet")
    meta = prepare_files([src], tok, tmp_path / "ds", fim_rate=0, heldout_fraction=0)
    expected = ["line one", "line 2 ü", "text file\n\nwith a blank line\n", "row a", "row c", "# markdown 7\n"]
    assert tok.decode(stream(tmp_path / "ds")) == "".join(BOS + d + EOS for d in expected)
    assert meta["num_documents"] == 6


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, r"missing\.txt: no such file"),
    ("empty.txt", b"", r"empty\.txt: no documents \(empty file\)"),
    ("blank.md", b" \n\n ", r"blank\.md: no documents"),
    ("bad.txt", b"fine\n\xff\xfe", r"bad\.txt: not valid UTF-8 \(byte offset 5\)"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b\xc3"}\n', r"bad\.jsonl: not valid UTF-8 \(line 2, byte offset 25\)"),
    ("notjson.jsonl", b'{"text": "a"}\n\n{"text": oops}\n', r"notjson\.jsonl: line 3 is not valid JSON"),
    ("notext.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"notext\.jsonl: line 2 has no \"text\" string field"),
    ("number.jsonl", b'{"text": 5}\n', r"number\.jsonl: line 1 has no \"text\" string field"),
    ("data.csv", b"a,b\n", r"data\.csv: unsupported file type '\.csv'"),
])
def test_file_errors_name_the_file_and_problem(tok, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_files([path], tok, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_parquet_errors(tok, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"], "id": [1]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: no 'text' column \(columns: body, id\)"):
        prepare_files([tmp_path / "x.parquet"], tok, tmp_path / "ds")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: the 'text' column holds int64"):
        prepare_files([tmp_path / "ints.parquet"], tok, tmp_path / "ds")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        prepare_files([tmp_path / "x.parquet"], tok, tmp_path / "ds")


def test_directory_without_supported_files(tok, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.csv").write_text("x")
    with pytest.raises(DataError, match="src: directory holds no"):
        prepare_files([tmp_path / "src"], tok, tmp_path / "ds")


# ---------------------------------------------------------------------- TokenLoader
SEQ = 8


def arange_dataset(tmp_path, windows: int, shards=(1.0,)):
    """A train split of tokens 0, 1, 2, ... (so a row's first input names its window), cut into shards."""
    tokens = np.arange(windows * SEQ + 1)
    cuts = (np.cumsum(shards)[:-1] * len(tokens)).astype(int)
    return write_dataset(tmp_path / "ds", {"train": np.split(tokens, cuts)}, vocab_size=10 ** 6)


def window_ids(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] // SEQ).tolist()


def test_batches_are_windows_with_shifted_targets(tmp_path):
    loader = TokenLoader(arange_dataset(tmp_path, 10, shards=(0.37, 0.21, 0.42)), seq_len=SEQ)
    for batch_size in (3, 1, 4):
        inputs, targets = loader.next_batch(batch_size)
        assert inputs.shape == targets.shape == (batch_size, SEQ)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        starts = inputs[:, :1]
        assert (starts % SEQ == 0).all()
        assert torch.equal(inputs, starts + torch.arange(SEQ))  # consecutive tokens, across shard boundaries too
        assert torch.equal(targets, inputs + 1)


def test_each_window_once_per_epoch_then_reshuffled(tmp_path):
    loader = TokenLoader(arange_dataset(tmp_path, 10), seq_len=SEQ, seed=5)
    seen = [w for bs in (3, 4, 2, 4, 5, 2) for w in window_ids(loader.next_batch(bs)[0])]
    assert sorted(seen[:10]) == sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20] and seen[:10] != list(range(10))
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["cursor"] == 0
    other_seed = TokenLoader(tmp_path / "ds", seq_len=SEQ, seed=6)
    assert window_ids(other_seed.next_batch(10)[0]) != seen[:10]


def test_resume_gives_identical_batches(tmp_path):
    directory = arange_dataset(tmp_path, 13)
    loader = TokenLoader(directory, seq_len=SEQ, seed=1)
    for bs in (4, 5, 3):
        loader.next_batch(bs)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch(bs) for bs in (2, 6, 7, 1)]
    resumed = TokenLoader(directory, seq_len=SEQ, seed=1)
    resumed.load_state_dict(state)
    for (x, y), bs in zip(expected, (2, 6, 7, 1), strict=True):
        x2, y2 = resumed.next_batch(bs)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(directory, seq_len=4, seed=1).load_state_dict(state)


def test_ranks_take_disjoint_windows(tmp_path):
    directory = arange_dataset(tmp_path, 12)
    ranks = [TokenLoader(directory, seq_len=SEQ, seed=2, rank=r, world_size=3) for r in range(3)]
    single = TokenLoader(directory, seq_len=SEQ, seed=2)
    for _ in range(2):  # 2 steps x 3 ranks x 2 windows = one epoch
        per_rank = [window_ids(loader.next_batch(2)[0]) for loader in ranks]
        assert sum(per_rank, []) == window_ids(single.next_batch(6)[0])
    assert ranks[0].state_dict() == single.state_dict()


def test_too_short_split(tmp_path):
    directory = write_dataset(tmp_path / "ds", {"train": [np.arange(SEQ)]}, vocab_size=100)
    with pytest.raises(DataError, match=f"train split has {SEQ} tokens; seq_len={SEQ} needs at least {SEQ + 1}"):
        TokenLoader(directory, seq_len=SEQ)
    with pytest.raises(DataError, match="heldout split has 0 tokens"):
        next(heldout_batches(directory, SEQ, 2))


def test_truncated_shard_is_detected(tmp_path):
    directory = arange_dataset(tmp_path, 4)
    with open(directory / "train_00000.bin", "r+b") as f:
        f.truncate(40)
    with pytest.raises(DataError, match="incomplete"):
        TokenLoader(directory, seq_len=SEQ)


def test_loader_reads_a_prepared_directory(tok, tmp_path):
    docs = make_docs(100)
    prepare_documents(docs, tok, tmp_path / "ds", fim_rate=0, heldout_fraction=0, shard_tokens=300)
    tokens = torch.tensor(stream(tmp_path / "ds"))
    loader = TokenLoader(tmp_path / "ds", seq_len=16)
    windows = (len(tokens) - 1) // 16
    inputs, targets = loader.next_batch(windows)  # one epoch: every window of the packed stream
    assert sorted(inputs.tolist()) == sorted(tokens[s:s + 16].tolist() for s in range(0, windows * 16, 16))
    assert sorted(targets.tolist()) == sorted(tokens[s + 1:s + 17].tolist() for s in range(0, windows * 16, 16))


def test_aligned_windows_open_on_a_document_start(tok, tmp_path):
    prepare_documents(make_docs(100), tok, tmp_path / "ds", fim_rate=0, heldout_fraction=0, shard_tokens=300)
    tokens = stream(tmp_path / "ds")
    seq = 64  # longer than any of these documents, so every window but the last holds a bos
    windows = (len(tokens) - 1) // seq
    expected = []  # by hand: the first bos in [i*seq, (i+1)*seq), else i*seq; never past the stream's end
    for i in range(windows):
        bos = [p for p in range(i * seq, (i + 1) * seq) if tokens[p] == tok.bos_id]
        start = min(bos[0], len(tokens) - seq - 1) if bos else i * seq
        expected.append(tokens[start:start + seq + 1])
    loader = TokenLoader(tmp_path / "ds", seq_len=seq, align_token=tok.bos_id)
    inputs, targets = loader.next_batch(windows)
    rows = torch.cat([inputs, targets[:, -1:]], dim=1).tolist()
    assert sorted(rows) == sorted(expected)
    assert sum(row[0] == tok.bos_id for row in rows) >= windows - 2  # nearly every window opens on a bos
    assert torch.equal(targets[:, :-1], inputs[:, 1:])


def test_heldout_batches_in_order(tmp_path):
    heldout = np.arange(7 * SEQ + 4)
    directory = write_dataset(tmp_path / "ds", {"train": [heldout], "heldout": [heldout[:20], heldout[20:]]},
                              vocab_size=10 ** 6)
    batches = list(heldout_batches(directory, SEQ, batch_size=3))
    assert [window_ids(x) for x, _ in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(heldout_batches(directory, SEQ, batch_size=3, max_batches=2))) == 2


# ---------------------------------------------------------------------- unigram_entropy
def test_unigram_entropy_by_hand(tmp_path):
    # train [0, 0, 1, 3], vocabulary 4: add-one probabilities (2+1, 1+1, 0+1, 1+1) / (4 + 4)
    directory = write_dataset(tmp_path / "ds", {"train": [[0, 0], [1, 3]], "heldout": [[2, 0]]}, vocab_size=4,
                              dtype="uint16")
    p = [3 / 8, 2 / 8, 1 / 8, 2 / 8]
    train = -(2 * math.log(p[0]) + math.log(p[1]) + math.log(p[3])) / 4
    heldout = -(math.log(p[2]) + math.log(p[0])) / 2
    assert unigram_entropy(directory) == pytest.approx(train, rel=1e-12)
    assert unigram_entropy(directory, "heldout") == pytest.approx(heldout, rel=1e-12)


def test_unigram_entropy_of_a_prepared_directory_is_below_uniform(tok, tmp_path):
    prepare_documents(make_docs(300), tok, tmp_path / "ds", heldout_fraction=0.1)
    value = unigram_entropy(tmp_path / "ds", "heldout")
    assert 1.0 < value < math.log(tok.vocab_size)
