"""Text sources for end-to-end evaluation: built-in (Python standard library source), files, folders.

Every source yields ``(name, text)`` documents. :func:`token_samples` turns documents into
``samples`` non-overlapping windows of ``seq_len`` tokens from one concatenated token stream, so
the same source, tokenizer and arguments always give the same samples.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_positive_int, fail

__all__ = ["stdlib_documents", "file_documents", "dir_documents", "token_samples", "describe_source", "sample_ids"]

_SEPARATOR = "\n\n"


def chat_text(tokenizer: Any, content: str) -> str:
    """``content`` as one user turn in the tokenizer's chat template with the generation prompt (plain
    ``content`` and a newline when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + "\n"


def trim_haystack(hay: list[list[int]], total: int, budget: int) -> list[list[int]]:
    """Cut the last of the tokenised sentences ``hay`` (``total`` tokens in all) so they hold exactly ``budget``
    tokens (dropping it if nothing is left); in place, returns ``hay``."""
    extra = total - budget
    if extra:
        hay[-1] = hay[-1][: len(hay[-1]) - extra]
        if not hay[-1]:
            hay.pop()
    return hay


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """The Python standard library's own top-level ``.py`` files, sorted by name (exists on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise fail("stdlib_documents", "stdlib", "holds no .py files", "the standard library's source", str(root))
    for p in files:
        try:
            yield p.name, p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue


def file_documents(patterns: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Files named by paths or glob patterns (``~`` expanded), in the given order, each pattern sorted."""
    any_found = False
    for pat in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True)) or []
        files = [m for m in matches if os.path.isfile(m)]
        if not files:
            raise fail("file_documents", "text file", "matches no file", "an existing path or glob", repr(pat))
        for f in files:
            any_found = True
            yield f, Path(f).read_text(encoding="utf-8", errors="replace")
    if not any_found:
        raise fail("file_documents", "patterns", "is empty", "at least one path", repr(list(patterns)))


def dir_documents(directory: str | os.PathLike, *, suffixes: Iterable[str] = (".txt", ".md")) -> Iterator[tuple[str, str]]:
    """Every file with one of ``suffixes`` directly inside ``directory``, sorted (e.g. a folder of essays)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise fail("dir_documents", "directory", "does not exist", "a folder of text files", str(d))
    sfx = tuple(suffixes)
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in sfx)
    if not files:
        raise fail("dir_documents", "directory", f"holds no {'/'.join(sfx)} files", "a folder of text files", str(d))
    for p in files:
        yield str(p), p.read_text(encoding="utf-8", errors="replace")


def documents_for(text_files: Sequence[str] | None = None, text_dir: str | None = None) -> tuple[Iterator[tuple[str, str]], str]:
    """The documents for CLI-style arguments, and a one-line description of the source."""
    if text_files and text_dir:
        raise fail("documents_for", "text_files/text_dir", "are mutually exclusive", "one source", "both")
    if text_files:
        return file_documents(text_files), f"files {list(text_files)}"
    if text_dir:
        return dir_documents(text_dir), f"folder {text_dir}"
    return stdlib_documents(), f"Python standard library source ({sysconfig.get_paths()['stdlib']}/*.py)"


def describe_source(text_files: Sequence[str] | None = None, text_dir: str | None = None) -> str:
    return documents_for(text_files, text_dir)[1]


def token_samples(documents: Iterable[tuple[str, str]], tokenizer: Any, *, seq_len: int, samples: int,
                  add_bos: bool = True) -> tuple[list[torch.Tensor], list[list[str]]]:
    """``samples`` windows of ``seq_len`` token ids from the concatenated documents.

    Documents are tokenised in order (joined by a blank line) until enough tokens exist; window
    ``i`` is tokens ``[i*L, (i+1)*L)`` of the stream (with the tokenizer's BOS first when it has one
    and ``add_bos``).

    Returns:
        ``(ids, names)``: ``ids[i]`` is a ``(1, seq_len)`` long tensor; ``names[i]`` the documents it spans.

    Raises:
        ValueError: the source holds fewer than ``samples * seq_len`` tokens.
    """
    fn = "token_samples"
    check_positive_int(fn, "seq_len", seq_len)
    check_positive_int(fn, "samples", samples)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    body = seq_len - (1 if bos is not None else 0)
    if body <= 0:
        raise fail(fn, "seq_len", "is too short", "at least 2 tokens", seq_len)
    need = body * samples
    stream: list[int] = []
    spans: list[tuple[int, str]] = []
    for name, text in documents:
        if not text.strip():
            continue
        spans.append((len(stream), name))
        stream.extend(tokenizer(text + _SEPARATOR, add_special_tokens=False)["input_ids"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise fail(fn, "source", "holds too few tokens", f"at least {need} ({samples} x {seq_len})", len(stream))
    ids, names = [], []
    for i in range(samples):
        lo, hi = i * body, (i + 1) * body
        chunk = stream[lo:hi]
        if bos is not None:
            chunk = [bos] + chunk
        ids.append(torch.tensor([chunk], dtype=torch.long))
        names.append([n for j, (start, n) in enumerate(spans)
                      if start < hi and (spans[j + 1][0] if j + 1 < len(spans) else len(stream)) > lo])
    return ids, names


def pick_windows(ids: Sequence[torch.Tensor], names: Sequence[list[str]], indices: Sequence[int], *,
                 half_offsets: bool = False, bos: bool = True) -> tuple[list[torch.Tensor], list[list[str]], list[str]]:
    """Windows ``indices`` of consecutive windows ``ids`` (from :func:`token_samples` / :func:`sample_ids`), and
    with ``half_offsets`` also, for every ``i`` with ``i + 1`` in ``indices``, the window that starts half a
    window after window ``i`` (it lies inside windows ``i`` and ``i + 1``, so it adds no text outside them).

    More training windows from a small corpus without touching held-out windows (``train-gate --windows``).
    ``bos``: each window starts with a BOS token that is not part of the text stream (as :func:`token_samples`
    writes them when the tokenizer has one); the half-offset windows get it too.

    Returns:
        ``(ids, names, labels)``: the selected windows first in ``indices`` order (labels ``wNN``), then the
        half-offset ones (``hNN``, named by both windows' documents).

    Raises:
        ValueError: an index outside ``ids``, a repeated index, or windows of different lengths.
    """
    fn = "pick_windows"
    n = len(ids)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad or not indices:
        raise fail(fn, "indices", "must be window indices", f"a non-empty list of ints in 0..{n - 1}", list(indices))
    if len(set(indices)) != len(indices):
        raise fail(fn, "indices", "repeat a window", "distinct indices", list(indices))
    lens = {int(t.shape[-1]) for t in ids}
    if len(lens) != 1:
        raise fail(fn, "ids", "are windows of different lengths", "equal-length windows", sorted(lens))
    out = [ids[i] for i in indices]
    out_names = [list(names[i]) for i in indices]
    labels = [f"w{i:02d}" for i in indices]
    if half_offsets:
        b = 1 if bos else 0
        body = lens.pop() - b
        chosen = set(indices)
        for i in indices:
            if i + 1 not in chosen:
                continue
            lo = body // 2
            row = torch.cat([ids[i][0, b + lo:], ids[i + 1][0, b:b + lo]])
            out.append(torch.cat([ids[i][0, :b], row])[None])
            out_names.append(sorted(set(names[i]) | set(names[i + 1])))
            labels.append(f"h{i:02d}")
    return out, out_names, labels


def sample_ids(model: Any, tokenizer: Any, *, seq_len: int, samples: int, text_files: Sequence[str] | None = None,
               text_dir: str | None = None, random_ids: bool = False, seed: int = 0) -> tuple[list[Any], list[list[str]], str]:
    """``samples`` token-id windows of ``seq_len`` for calibration / training commands (``tune``, ``train-gate``).

    From text (``text_files`` / ``text_dir``, else the Python standard library's source) through
    :func:`token_samples`; with ``random_ids`` (or no tokenizer) seeded random ids over the model's vocabulary.

    Returns:
        ``(ids, names, source)``: ``(1, seq_len)`` int64 tensors, the document names each window came
        from, and a one-line description of the source.
    """
    if random_ids or tokenizer is None:
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, vocab, (1, seq_len), generator=g) for _ in range(samples)]
        return ids, [[f"random ids #{i} (seed {seed})"] for i in range(samples)], f"random token ids (seed {seed})"
    docs, source = documents_for(text_files, text_dir)
    ids, names = token_samples(docs, tokenizer, seq_len=seq_len, samples=samples)
    return ids, names, source
