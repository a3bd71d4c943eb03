"""Training data: byte tokenizer, built-in corpus, associative recall, and a resumable loader.

The loader is a plain index computation rather than a grain pipeline: batch ``step`` is a pure
function of ``(seed, step, process_index)``, so the whole loader state is the step number
(checkpointed with the model), resuming is exact, and each host reads only its own rows.
Batches are dicts of numpy arrays: ``inputs_BT`` and ``targets_BT`` (int32 token ids) and
``weights_BT`` (float32, 0 where a position does not count towards the loss).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np

from train import _corpus

__all__ = [
    "ByteTokenizer",
    "builtin_corpus",
    "load_tokens",
    "WindowLoader",
    "RecallLoader",
    "make_loaders",
]


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no special tokens, lossless on valid text."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """Token ids, shape [T] int32, of ``text``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids_T) -> str:
        """Text of token ids ``ids_T`` (invalid UTF-8 sequences become U+FFFD)."""
        return bytes(int(i) & 0xFF for i in np.asarray(ids_T).reshape(-1)).decode(
            "utf-8", errors="replace"
        )


@functools.cache
def builtin_corpus() -> str:
    """~0.5 MB of English text: docstrings of a fixed list of stdlib modules and their members.

    Needs no download and is deterministic for a given Python installation: it is read in a
    fresh isolated interpreter (``python -I -S train/_corpus.py``), because other libraries
    patch stdlib members in this process (torch replaces ``inspect.getfile``), which would
    change the text and so the batches from one process to the next.
    """
    out = subprocess.run(
        [sys.executable, "-I", "-S", _corpus.__file__], capture_output=True, check=True
    )
    return out.stdout.decode("utf-8")


def load_tokens(source: str) -> np.ndarray:
    """All token ids of a data source, shape [N].

    Args:
      source: ``"builtin"``, a ``.npy`` file of integer ids (memory-mapped, never pickled), a
        text file, or a directory whose ``*.txt`` files are joined in sorted order.

    Raises:
      FileNotFoundError: a path that does not exist. ValueError: a bad ``.npy`` array.
    """
    if source == "builtin":
        return ByteTokenizer().encode(builtin_corpus())
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"{source!r} does not exist (a data source is 'builtin', 'recall' or a path)"
        )
    if source.endswith(".npy"):
        tokens = np.load(source, mmap_mode="r", allow_pickle=False)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"{source!r}: need a 1-D integer array of token ids, got shape {tokens.shape} "
                f"dtype {tokens.dtype}"
            )
        return tokens
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.endswith(".txt"))
        if not names:
            raise FileNotFoundError(f"{source!r} is a directory holding no .txt files")
        texts = [open(os.path.join(source, n), encoding="utf-8").read() for n in names]
        return ByteTokenizer().encode("\n\n".join(texts))
    with open(source, encoding="utf-8") as f:
        return ByteTokenizer().encode(f.read())


def _local_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The rows of a global batch that this host loads."""
    if global_batch % process_count:
        raise ValueError(f"{global_batch=} must be a multiple of {process_count=}")
    per_host = global_batch // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


class WindowLoader:
    """Shuffled windows of ``seq_len + 1`` tokens from a token array, one epoch at a time.

    Global row ``g = step * global_batch + r`` is window ``perm[epoch][g % num_windows]``, with
    ``epoch = g // num_windows`` and a permutation seeded by ``(seed, epoch)``. With
    ``shuffle=False`` windows come in order (held-out evaluation).
    """

    def __init__(
        self,
        tokens_N,
        *,
        seq_len,
        global_batch,
        seed=0,
        shuffle=True,
        process_index=0,
        process_count=1,
    ):
        self.tokens_N, self.seq_len, self.global_batch = tokens_N, seq_len, global_batch
        self.seed, self.shuffle = seed, shuffle
        self.rows = _local_rows(global_batch, process_index, process_count)
        self.num_windows = (len(tokens_N) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens_N)} tokens are too few for {seq_len=}")
        self._perm_epoch, self._perm = -1, None

    def _window(self, g: int) -> int:
        epoch, i = divmod(g, self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``step``: arrays of shape [B_local, T]."""
        starts = [self._window(step * self.global_batch + r) * self.seq_len for r in self.rows]
        win = np.stack([np.asarray(self.tokens_N[s : s + self.seq_len + 1]) for s in starts])
        win = win.astype(np.int32)
        return {
            "inputs_BT": win[:, :-1],
            "targets_BT": win[:, 1:],
            "weights_BT": np.ones(win[:, 1:].shape, np.float32),
        }


class RecallLoader:
    """Synthetic associative recall: key/value pairs, then queries whose answer must be recalled.

    Row layout: ``k1 v1 k2 v2 ... kn vn q1 a1 q2 a2 ...``; keys are tokens 128..191 (distinct in
    a row), values 192..255; the loss counts only the answers ``a_i`` (the value paired with
    ``q_i`` earlier in the row). Row ``g`` is generated from ``(seed, g)``, so it is resumable.
    """

    def __init__(self, *, seq_len, global_batch, seed=0, process_index=0, process_count=1):
        if seq_len < 8:
            raise ValueError(f"associative recall needs seq_len >= 8, got {seq_len=}")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.rows = _local_rows(global_batch, process_index, process_count)
        self.num_pairs = min(64, seq_len // 4)

    def _row(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, g))
        keys = 128 + rng.permutation(64)[: self.num_pairs]
        values = rng.integers(192, 256, self.num_pairs)
        num_queries = (self.seq_len + 1 - 2 * self.num_pairs + 1) // 2
        q = rng.integers(0, self.num_pairs, num_queries)
        seq = np.concatenate(
            [np.stack([keys, values], 1).reshape(-1), np.stack([keys[q], values[q]], 1).reshape(-1)]
        )[: self.seq_len + 1]
        weights = np.zeros(self.seq_len, np.float32)
        weights[2 * self.num_pairs :: 2] = 1.0  # target of a query key is its answer
        return seq.astype(np.int32), weights

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``step``: arrays of shape [B_local, T]."""
        rows = [self._row(step * self.global_batch + r) for r in self.rows]
        seq = np.stack([s for s, _ in rows])
        return {
            "inputs_BT": seq[:, :-1],
            "targets_BT": seq[:, 1:],
            "weights_BT": np.stack([w for _, w in rows]),
        }


def make_loaders(config, process_index=0, process_count=1):
    """Train and held-out loaders for a :class:`train.config.TrainConfig`.

    Returns:
      ``(train_loader, eval_loader)``; both have ``batch(step) -> dict`` of local rows.

    Raises:
      ConfigError: a data source that does not exist or cannot be used, a training split
        with fewer windows than one batch has rows, or a held-out split without one window.
    """
    from train.config import ConfigError

    try:
        return _make_loaders(config, process_index, process_count)
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        if isinstance(err, ConfigError):
            raise
        text = str(err)
        text = text if text.startswith(repr(config.data)) else f"{config.data!r}: {text}"
        raise ConfigError(f"data={text}") from None


def _make_loaders(config, process_index, process_count):
    common = dict(
        seq_len=config.seq_len,
        global_batch=config.batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    if config.data == "recall":
        # a disjoint seed stream for held-out rows
        return (
            RecallLoader(seed=config.seed, **common),
            RecallLoader(seed=config.seed + 1_000_003, **common),
        )
    tokens_N = load_tokens(config.data)
    split = int(len(tokens_N) * (1.0 - config.eval_fraction))
    windows = (split - 1) // config.seq_len
    if windows < config.batch_size:
        raise ValueError(
            f"{len(tokens_N)} tokens leave {split} for training: {max(windows, 0)} windows of "
            f"seq_len+1={config.seq_len + 1} tokens, fewer than one batch of "
            f"batch_size={config.batch_size} rows (use more data or a smaller seq_len/batch_size)"
        )
    if len(tokens_N) - split - 1 < config.seq_len:
        raise ValueError(
            f"the held-out split (eval_fraction={config.eval_fraction} of {len(tokens_N)} "
            f"tokens = {len(tokens_N) - split}) is too small for one window of "
            f"seq_len+1={config.seq_len + 1} tokens (raise eval_fraction or use more data)"
        )
    return (
        WindowLoader(tokens_N[:split], seed=config.seed, **common),
        WindowLoader(tokens_N[split:], shuffle=False, **common),
    )
