"""RULER-style long-context tasks, generated offline, dense vs sparse (``sparseattn ruler``).

Seven of RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the real context size of
your long-context language models?"), generated here from a seed and any text (a folder of
``.txt`` / ``.md`` files, e.g. the essays, or RULER's filler sentences when none is given), at an
exact token budget for the model's own tokenizer:

=================== =====================================================================================
``niah_single``     one "special magic number" needle (a key and a 7-digit value) in the haystack; asked for it.
``niah_multikey``   four needles with different keys; asked for one key's value (three distractors).
``niah_multivalue`` four needles with the same key and different values; asked for all four values.
``niah_multiquery`` four needles with different keys; asked for all four keys' values.
``vt``              variable tracking: ``VAR ABCDE = 12345.`` then ``VAR FGHIJ = VAR ABCDE.`` ... (4 hops)
                    spread through the haystack; asked for every variable holding the value (5 names).
``cwe``             common-words extraction: a numbered list of words in which 10 words appear often
                    (30 times each when the length allows) and the rest rarely (3 times); asked for the 10.
``fwe``             frequent-words extraction: a "coded text" of random 6-letter words with Zipf (alpha 2)
                    frequencies (the dots ``....`` most frequent, to be ignored); asked for the top 3 words.
=================== =====================================================================================

Prompts use RULER's wording, go through the model's chat template (when it has one) and end with
RULER's answer prefix, like :mod:`sparseattn.eval.niah`. Scoring is RULER's ``string_match_all``:
the share of the expected strings found (case-insensitive substring) in the greedy continuation
(cut at the first special token), averaged over samples. The same prompt runs through the dense
model and through the model patched with each sparse configuration (the machinery of
:mod:`sparseattn.eval.niah`: :func:`sparseattn.models.load`, ``patch_model``, ``greedy_generate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import string
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseattn._validation import check_nonneg_int, check_positive_int, fail
from sparseattn.eval.defaults import DEFAULT_PREDICTOR_SPEC
from sparseattn.eval.texts import chat_text, trim_haystack

__all__ = ["TASKS", "TASK_INFO", "DEFAULT_GEN_TOKENS", "RULER_DEFAULT_LENGTHS", "FLOOR_LABEL", "parse_tasks", "parse_configs", "make_ruler_sample",
           "string_match_all", "RulerResult", "run_ruler", "write_ruler_report", "ruler_heatmap"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

#: One line per task (docs, reports).
TASK_INFO = {
    "niah_single": "one key-value needle in the haystack; answer: its 7-digit value",
    "niah_multikey": "4 needles with different keys; answer: the value of the one asked for",
    "niah_multivalue": "4 needles with one key; answer: all 4 values",
    "niah_multiquery": "4 needles with different keys; answer: the values of all 4 keys",
    "vt": "variable tracking: a chain of 4 assignments through the haystack; answer: the 5 variable names",
    "cwe": "common-words extraction: the 10 most frequent words of a numbered word list",
    "fwe": "frequent-words extraction: the 3 most frequent coded words of a Zipf-distributed text",
}

#: Greedy tokens per task (enough for the answer's format; ``gen_tokens=`` overrides all of them).
DEFAULT_GEN_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
                      "vt": 30, "cwe": 120, "fwe": 50}

RULER_DEFAULT_LENGTHS = (1024, 2048)

FLOOR_LABEL = "all blocks (floor)"  # every causal block through sparseattn's kernel: the half-precision noise floor

_NIAH_TEMPLATE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the numbers afterwards.\n{context}\n"
                  "What are all the special magic numbers for {query} mentioned in the provided text?")
_NIAH_PREFIX = " The special magic numbers for {query} mentioned in the provided text are"
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                "Question: Find all variables that are assigned the value {query} in the text above.")
_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
              "assigned the value {query}, they are:")
_CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.\n{context}\n"
                 "Question: What are the {n} most common words in the above list?")
_CWE_PREFIX = " Answer: The top {n} words that appear most often in the list are:"
_FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words.{context}\nQuestion: Do not provide any explanation. Please ignore "
                 "the dots '....'. What are the three most frequently appeared words in the above coded text?")
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

_NIAH_NEEDLES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
                 "niah_multiquery": (4, 1, 4)}  # (keys, values per key, keys asked)
_VT_HOPS = 4
_CWE_COMMON, _CWE_FREQ_COMMON, _CWE_FREQ_RARE = 10, 30, 3
_FWE_ALPHA, _FWE_TOP, _FWE_DOTS, _FWE_WORDLEN = 2.0, 3, "....", 6
_FWE_ZETA = sum(r ** -_FWE_ALPHA for r in range(1, 20_001)) + 20_000 ** (1 - _FWE_ALPHA) / (_FWE_ALPHA - 1)  # zeta(alpha)
_MARKER = "\u0000CONTEXT\u0000"


# --------------------------------------------------------------------------- generation
def parse_tasks(tasks: str | Iterable[str] | None, func: str = "parse_tasks") -> list[str]:
    """``"all"`` / ``None`` → every task; otherwise a comma-separated string or list of task names (checked)."""
    if tasks is None or (isinstance(tasks, str) and tasks.strip() in ("", "all")):
        return list(TASKS)
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    bad = [t for t in items if t not in TASKS]
    if bad or not items:
        raise fail(func, "tasks", f"has unknown task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}"
                   if bad else "must not be empty", f"'all' or a comma-separated subset of {', '.join(TASKS)}", repr(tasks))
    return list(dict.fromkeys(items))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _frame(tokenizer: Any, template: str, prefix: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context: chat template (if any) around the task text, then the answer prefix."""
    content = template.replace("{context}", _MARKER)
    text = chat_text(tokenizer, content)
    text += prefix.lstrip() if text.endswith(("\n", " ")) else prefix
    before, _, after = text.partition(_MARKER)
    pre = _ids(tokenizer, before)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not pre or pre[0] != bos):
        pre = [bos] + pre
    return pre, _ids(tokenizer, after)


def _haystack(tokenizer: Any, sentences: Sequence[str], budget: int, rng: random.Random, *,
              random_start: bool) -> list[list[int]]:
    """Sentences (cycled from a seeded start for real text) tokenised one by one until exactly ``budget`` tokens."""
    if budget <= 0:
        return []
    i = rng.randrange(len(sentences)) if random_start else 0
    hay: list[list[int]] = []
    total = 0
    while total < budget:
        ids = _ids(tokenizer, " " + sentences[i % len(sentences)])
        if ids:
            hay.append(ids)
            total += len(ids)
        i += 1
        if i > 10 * len(sentences) + budget:  # a tokenizer that yields nothing for every sentence
            raise fail("make_ruler_sample", "haystack", "tokenises to no tokens", "text the tokenizer encodes", "nothing")
    return trim_haystack(hay, total, budget)


def _insert(hay: list[list[int]], pieces: Sequence[list[int]], rng: random.Random) -> tuple[list[int], list[float]]:
    """Insert ``pieces`` in order at seeded random sentence boundaries; returns the ids and each piece's depth."""
    slots = sorted(rng.randint(0, len(hay)) for _ in pieces)
    out: list[int] = []
    depths: list[float] = []
    j = 0
    for at in range(len(hay) + 1):
        while j < len(pieces) and slots[j] == at:
            depths.append(at / max(1, len(hay)))
            out.extend(pieces[j])
            j += 1
        if at < len(hay):
            out.extend(hay[at])
    return out, depths


def _too_short(task: str, length: int, need: int) -> ValueError:
    return fail("make_ruler_sample", "length", f"is too short for task {task!r} (its question, answer prefix and "
                "items alone need more)", f"> {need} tokens", length)


def _key(rng: random.Random, used: set[str]) -> str:
    from sparseattn.eval.niah import _WORDS

    while True:
        k = "-".join(rng.sample(_WORDS, 2))
        if k not in used:
            used.add(k)
            return k


def _number(rng: random.Random, used: set[str], digits: int) -> str:
    while True:
        v = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if v not in used:
            used.add(v)
            return v


def _niah(tokenizer: Any, task: str, length: int, rng: random.Random, sentences: Sequence[str],
          random_start: bool) -> dict[str, Any]:
    n_keys, n_values, n_query = _NIAH_NEEDLES[task]
    used: set[str] = set()
    keys = [_key(rng, used) for _ in range(n_keys)]
    values = {k: [_number(rng, used, 7) for _ in range(n_values)] for k in keys}
    asked = keys[:n_query] if n_query > 1 else [rng.choice(keys)]
    query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    needles = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    pieces = [_ids(tokenizer, " " + _NIAH_NEEDLE.format(key=k, value=v)) for k, v in needles]
    pre, post = _frame(tokenizer, _NIAH_TEMPLATE.replace("{query}", query), _NIAH_PREFIX.format(query=query))
    budget = length - len(pre) - len(post) - sum(map(len, pieces))
    if budget < 1:
        raise _too_short(task, length, length - budget)
    body, depths = _insert(_haystack(tokenizer, sentences, budget, rng, random_start=random_start), pieces, rng)
    answers = [v for k in asked for v in values[k]]
    return {"ids": pre + body + post, "answers": answers, "query": query,
            "meta": {"needles": [{"key": k, "value": v, "depth": round(d, 4)} for (k, v), d in zip(needles, depths)]}}


def _vt(tokenizer: Any, length: int, rng: random.Random, sentences: Sequence[str], random_start: bool) -> dict[str, Any]:
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in names:
            names.append(v)
    value = str(rng.randint(10000, 99999))
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(_VT_HOPS)]
    pieces = [_ids(tokenizer, " " + s) for s in stmts]
    pre, post = _frame(tokenizer, _VT_TEMPLATE.replace("{query}", value),
                       _VT_PREFIX.format(n=len(names), query=value))
    budget = length - len(pre) - len(post) - sum(map(len, pieces))
    if budget < 1:
        raise _too_short("vt", length, length - budget)
    body, depths = _insert(_haystack(tokenizer, sentences, budget, rng, random_start=random_start), pieces, rng)
    return {"ids": pre + body + post, "answers": names, "query": value,
            "meta": {"chain": stmts, "depths": [round(d, 4) for d in depths]}}


_WORD_RE = re.compile(r"(?<![a-z])[a-z]{4,12}(?![a-z])")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
# frequent words that would match by accident in almost any answer (the answers are matched as substrings)
_STOP = frozenset("""that this with from have were which there their what when where would could should about into
than then them they been also more most some such only other very just over your will like these those because
being does each here many much must said same shall since still take very well while whom whose years""".split())


def _vocabulary(texts: Iterable[str]) -> list[str]:
    """Distinct lowercase words (4-12 letters, common function words left out) of the texts, in order of first
    appearance: the words of ``cwe``."""
    seen: dict[str, None] = {}
    for t in texts:
        for w in _WORD_RE.findall(t.lower()):
            if w not in _STOP:
                seen.setdefault(w, None)
    return list(seen)


def _fits(word: str, answers: Sequence[str], avoid: str) -> bool:
    """An answer word must not hide in the prompt's own text, contain another answer or be contained in one."""
    return word not in avoid and not any(word in a or a in word for a in answers)


def _words(vocab: Sequence[str], n_answers: int, n: int, rng: random.Random, avoid: str) -> list[str]:
    """``n`` distinct words, the first ``n_answers`` of them answers that substring matching cannot confuse (no answer
    inside another word of the list or inside ``avoid``, the prompt's fixed text); a seeded sample of ``vocab``,
    topped up with seeded pseudo-words."""
    pool = list(vocab)
    rng.shuffle(pool)
    pool.reverse()  # popped from the end: the shuffled order

    def candidate() -> str:
        if pool:
            return pool.pop()
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))

    answers: list[str] = []
    others: list[str] = []
    have: set[str] = set()
    while len(answers) + len(others) < n:
        w = candidate()
        if w in have:
            continue
        if len(answers) < n_answers:
            if not _fits(w, answers, avoid):
                continue
            answers.append(w)
        elif any(a in w for a in answers):
            continue
        else:
            others.append(w)
        have.add(w)
    return answers + others


def _cwe(tokenizer: Any, length: int, rng: random.Random, vocab: Sequence[str]) -> dict[str, Any]:
    pre, post = _frame(tokenizer, _CWE_TEMPLATE.replace("{n}", str(_CWE_COMMON)),
                       _CWE_PREFIX.format(n=_CWE_COMMON))
    budget = length - len(pre) - len(post)
    cost_cache: dict[str, int] = {}

    def cost(piece: str) -> int:
        if piece not in cost_cache:
            cost_cache[piece] = len(_ids(tokenizer, piece))
        return cost_cache[piece]

    # the whole list must fit: common words take at most half the budget (fewer repeats at short lengths)
    avoid = (_CWE_TEMPLATE + _CWE_PREFIX).lower()
    words_all = _words(vocab, _CWE_COMMON, max(4 * _CWE_COMMON, budget // 2 + _CWE_COMMON), rng, avoid)
    avg = max(1.0, sum(cost(" " + w) for w in words_all[:50]) / min(50, len(words_all)) + cost(" 99."))
    cap = int(budget / avg)
    freq_c, freq_r = _CWE_FREQ_COMMON, _CWE_FREQ_RARE
    if _CWE_COMMON * freq_c > cap // 2:
        freq_c = max(2, cap // (2 * _CWE_COMMON))
        freq_r = max(1, min(_CWE_FREQ_RARE, freq_c // 3))
    common, rare_pool = words_all[:_CWE_COMMON], words_all[_CWE_COMMON:]
    order_seed = rng.random()

    def build(n_rare: int) -> list[str]:
        items = [w for w in common for _ in range(freq_c)] + [w for w in rare_pool[:n_rare] for _ in range(freq_r)]
        random.Random(f"{order_seed}-{n_rare}").shuffle(items)
        return items

    def total(items: list[str]) -> int:
        return sum(cost(f" {i + 1}.") + cost(" " + w) for i, w in enumerate(items))

    lo, hi = 0, len(rare_pool)
    if total(build(0)) > budget:
        raise _too_short("cwe", length, len(pre) + len(post) + total(build(0)))
    while lo < hi:  # the most rare words that still fit
        mid = (lo + hi + 1) // 2
        if total(build(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    items = build(lo)
    body = [t for i, w in enumerate(items) for t in _ids(tokenizer, f" {i + 1}.") + _ids(tokenizer, " " + w)]
    return {"ids": pre + body + post, "answers": list(common), "query": f"top {_CWE_COMMON}",
            "meta": {"freq_common": freq_c, "freq_rare": freq_r, "rare_words": lo, "items": len(items),
                     "words_from_text": len(set(common + rare_pool[:lo]) & set(vocab))}}


def _fwe(tokenizer: Any, length: int, rng: random.Random) -> dict[str, Any]:
    pre, post = _frame(tokenizer, _FWE_TEMPLATE, _FWE_PREFIX)
    budget = length - len(pre) - len(post)
    vocab_n = max(budget // 50, 2 * _FWE_TOP + 4)  # RULER: max_seq_length // 50 coded words, rank 1 the dots
    words = [_FWE_DOTS]
    seen = set(words)
    avoid = (_FWE_TEMPLATE + _FWE_PREFIX).lower()
    while len(words) < vocab_n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(_FWE_WORDLEN))
        answers = words[1:1 + _FWE_TOP]
        if w in seen or (len(answers) < _FWE_TOP and not _fits(w, answers, avoid)) or any(a in w for a in answers):
            continue
        seen.add(w)
        words.append(w)
    costs = [len(_ids(tokenizer, " " + w)) for w in words]

    def counts(t: int) -> list[int]:  # RULER: count of rank r = t * r^-alpha / zeta(alpha), rounded down
        return [int(t * (r ** -_FWE_ALPHA) / _FWE_ZETA) for r in range(1, len(words) + 1)]

    lo, hi = 0, budget
    while lo < hi:  # the most items whose Zipf counts still fit the budget
        mid = (lo + hi + 1) // 2
        if sum(c * k for c, k in zip(counts(mid), costs)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    cnt = counts(lo)
    ranked = cnt[1:]  # the words after the dots, most frequent first
    if len(ranked) <= _FWE_TOP or ranked[_FWE_TOP - 1] <= ranked[_FWE_TOP] or ranked[_FWE_TOP] < 1:
        raise fail("make_ruler_sample", "length", "is too short for task 'fwe' (the Zipf counts of its top words "
                   f"tie: {ranked[:_FWE_TOP + 1]})", "a longer length (a few hundred tokens of coded text)", length)
    items = [w for w, c in zip(words, cnt) for _ in range(c)]
    rng.shuffle(items)
    body = [t for w in items for t in _ids(tokenizer, " " + w)]
    return {"ids": pre + body + post, "answers": words[1:1 + _FWE_TOP], "query": f"top {_FWE_TOP}",
            "meta": {"counts": {w: c for w, c in zip(words[: 2 + _FWE_TOP], cnt)}, "items": len(items),
                     "distinct_words": sum(1 for c in cnt if c)}}


def make_ruler_sample(tokenizer: Any, task: str, *, length: int, seed: int | str = 0,
                      sentences: Sequence[str] | None = None, vocabulary: Sequence[str] | None = None) -> dict[str, Any]:
    """One prompt of ``task`` with at most ``length`` tokens (NIAH and ``vt`` exactly ``length``; the word lists
    of ``cwe`` / ``fwe`` end at the last whole item that fits).

    Args:
        tokenizer: the model's tokenizer (its chat template is used when it has one).
        task: one of :data:`TASKS`.
        length: the token budget of the whole prompt.
        seed: everything random (keys, values, positions, words, order) comes from it.
        sentences: haystack sentences (NIAH, ``vt``); ``None`` = RULER's filler sentences.
        vocabulary: words for ``cwe`` (e.g. from the text folder); topped up with pseudo-words when short.

    Returns:
        ``{"task", "length", "prompt_tokens", "input_ids" (1, prompt_tokens), "answers": [str], "query",
        "meta"}``.
    """
    from sparseattn.eval.niah import _sentences

    fn = "make_ruler_sample"
    check_positive_int(fn, "length", length)
    if task not in TASKS:
        raise fail(fn, "task", "is unknown", f"one of {', '.join(TASKS)}", repr(task))
    rng = random.Random(f"ruler-{task}-{length}-{seed}")
    real = sentences is not None
    sents = list(sentences) if real else _sentences(None)
    if not sents:
        raise fail(fn, "sentences", "is empty", "at least one haystack sentence", "[]")
    if task in _NIAH_NEEDLES:
        out = _niah(tokenizer, task, length, rng, sents, real)
    elif task == "vt":
        out = _vt(tokenizer, length, rng, sents, real)
    elif task == "cwe":
        out = _cwe(tokenizer, length, rng, list(vocabulary) if vocabulary is not None else _vocabulary(sents))
    else:
        out = _fwe(tokenizer, length, rng)
    ids = out["ids"]
    if len(ids) > length:  # a bug, not a user error
        raise RuntimeError(f"make_ruler_sample: built {len(ids)} tokens for a budget of {length} ({task})")
    return {"task": task, "length": length, "prompt_tokens": len(ids), "input_ids": torch.tensor([ids], dtype=torch.long),
            "answers": out["answers"], "query": out["query"], "meta": out["meta"]}


# --------------------------------------------------------------------------- scoring
def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the share of ``answers`` found (case-insensitive substring) in ``prediction``."""
    if not answers:
        raise fail("string_match_all", "answers", "is empty", "at least one expected string", "[]")
    pred = prediction.lower()
    return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special token ids (EOS, end of turn, ...): where a continuation ends."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        special.add(eos)
    return frozenset(special)


def _continuation(tokenizer: Any, tokens: Sequence[int]) -> str:
    """Decode greedy tokens up to the first special token (EOS, end of turn)."""
    special = _special_ids(tokenizer)
    cut = next((i for i, t in enumerate(tokens) if t in special), len(tokens))
    return tokenizer.decode(list(tokens[:cut]), skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- running
@dataclasses.dataclass
class RulerResult:
    """Scores ``scores[config][task][str(length)]`` (mean over samples), per-case records, densities."""

    config: dict[str, Any]
    tasks: list[str]
    lengths: list[int]
    configs: list[str]
    scores: dict[str, dict[str, dict[str, float]]]
    cases: list[dict[str, Any]]
    summary: dict[str, Any]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        w = min(30, max(12, *(len(c) for c in self.configs))) + 2  # long specs are cut here (ruler.md has them whole)
        lines = [f"sparseattn ruler: {self.config['model']} | {self.config['samples']} sample(s) per task and length | "
                 f"haystack: {self.config['haystack']}",
                 "task".ljust(18) + "length".rjust(8) + "".join(_short_label(c, w - 2).rjust(w) for c in self.configs)]
        for t in self.tasks:
            for n in self.lengths:
                lines.append(t.ljust(18) + str(n).rjust(8)
                             + "".join(f"{self.scores[c][t][str(n)]:.2f}".rjust(w) for c in self.configs))
        s = self.summary
        lines.append("mean".ljust(26) + "".join(f"{s['mean_score'][c]:.3f}".rjust(w) for c in self.configs))
        lines.append("sparsity".ljust(26) + "".join(
            ("-" if s["sparsity"][c] is None else f"{s['sparsity'][c]:.3f}").rjust(w) for c in self.configs))
        spl = s.get("sparsity_predicted_layers", {})
        lines.append("sparsity, predicted layers".ljust(26) + "".join(
            ("-" if spl.get(c) is None else f"{spl[c]:.3f}").rjust(w) for c in self.configs))
        return "\n".join(lines)


def _short_label(label: str, width: int) -> str:
    """``label`` cut to ``width`` for the console table, keeping a dense-tail suffix visible (``… +tail128``)."""
    if len(label) <= width:
        return label
    base, sep, tail = label.rpartition(" + dense tail ")
    if sep:
        suffix = f" +tail{tail}"
        return base[: max(0, width - len(suffix))] + suffix
    return label[:width]


def parse_configs(predictors: str | Sequence[str] | None, patterns: str | Sequence[str] | None) -> list[tuple[str, Any]]:
    """``(label, predictor)`` for each predictor / pattern spec (parsed here: a bad spec fails before a model loads)."""
    from sparseattn.eval.bench_model import parse_rows

    return [(r.label, r.predictor) for r in parse_rows(predictors, patterns) if r.kind != "all_blocks"]


def run_ruler(
    model_name: str = "smollm2-135m",
    *,
    model: Any = None,
    tokenizer: Any = None,
    predictors: str | Sequence[str] | None = DEFAULT_PREDICTOR_SPEC,
    patterns: str | Sequence[str] | None = None,
    tuned: Any = None,
    dense_layers: Sequence[int] = (),
    tasks: str | Sequence[str] | None = None,
    lengths: Sequence[int] = RULER_DEFAULT_LENGTHS,
    samples: int = 2,
    text_files: Sequence[str] | None = None,
    text_dir: str | None = None,
    gen_tokens: int | None = None,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    runs_path: str | Path | None = None,
    batch_size: int | None = None,
    floor: bool | None = None,
    dense_tails: Sequence[int] = (0,),
) -> RulerResult:
    """RULER scores of the dense model and of each sparse configuration, per task × length.

    Args:
        model_name / model, tokenizer: what to run (see :func:`sparseattn.models.load`).
        predictors: ``';'``-separated predictor specs (or a list), one sparse configuration each.
        patterns: ``';'``-separated static patterns (or a list), one configuration each.
        tuned: a tuned file from ``sparseattn tune`` (or a ``TunedConfig``): one more configuration,
            checked against the model; its dense layers are added for that configuration.
        dense_layers: layers kept dense in every sparse configuration.
        tasks: ``"all"`` / ``None`` or a subset of :data:`TASKS`.
        lengths: prompt budgets in tokens.
        samples: prompts per task and length (seeded; the same prompts for every configuration).
        text_files / text_dir: the haystack (and ``cwe`` word) source; ``None`` = RULER's filler sentences.
        gen_tokens: greedy tokens for every task (default: :data:`DEFAULT_GEN_TOKENS` per task).
        seed: the prompts depend only on it, the task, the length, the sample index and the tokenizer.
        runs_path: a JSONL file that gets one line per finished run (configuration × prompt: score,
            density, output) as soon as it finishes, so an interrupted job keeps its measurements.
        batch_size: prompts generated together. Only prompts of the same task, length and token count share
            a batch (no padding: NIAH and ``vt`` prompts are exactly ``length`` tokens, ``cwe`` / ``fwe`` often
            differ and then run alone). ``None``: 8 on CUDA (eager decode of a small model is host-bound, so a
            batch costs about one prompt), 1 on the CPU. A batched prompt's density is its batch's mean, its
            ``prefill_s`` the batch's prefill time divided by the batch size. A batch that runs out of GPU
            memory is run again as two halves (down to single prompts), with one warning.
        floor: also run the **all-blocks** configuration (every causal block through sparseattn's kernel,
            :data:`FLOOR_LABEL`): what the kernel's rounding alone changes, the noise floor the sparse
            configurations are compared with as well as dense (``summary["delta_vs_floor"]``). ``None``: on for
            half-precision dtypes (where the kernel and the model's attention round differently), off in float32.
        dense_tails: each sparse configuration (the floor aside) runs once per value, with
            ``patch_model(dense_tail=value)``: the last ``value`` prompt tokens attend every causal block
            (labelled ``"<config> + dense tail <value>"``; 0 = the configuration as given).
    """
    from tqdm.auto import tqdm

    from sparseattn.eval import end_to_end
    from sparseattn.eval.env import environment
    from sparseattn.eval.niah import _sentences
    from sparseattn.integrations.transformers_patch import patch_model
    from sparseattn.predictors.resolve import describe_predictor, tuned_predictor

    fn = "run_ruler"
    task_list = parse_tasks(tasks, fn)
    lengths = [check_positive_int(fn, "lengths", int(n)) for n in lengths]
    if not lengths:
        raise fail(fn, "lengths", "must not be empty", "at least one length", "[]")
    check_positive_int(fn, "samples", samples)
    if gen_tokens is not None:
        check_positive_int(fn, "gen_tokens", gen_tokens)
    if batch_size is not None:
        check_positive_int(fn, "batch_size", batch_size)
    rows = parse_configs(predictors, patterns)
    tails = [check_nonneg_int(fn, "dense_tail", t) for t in dense_tails]
    if not tails or len(set(tails)) != len(tails):
        raise fail(fn, "dense_tails", "must be distinct and non-empty", "e.g. (0,) or (0, 128)", list(dense_tails))
    if not rows and tuned is None:
        raise fail(fn, "predictors/patterns/tuned", "give no sparse configuration", "at least one spec or a tuned file",
                   "none")
    t0 = time.perf_counter()
    from sparseattn.models import model_and_tokenizer

    model, tokenizer = model_and_tokenizer(fn, model_name, model, tokenizer, dtype=dtype, device=device)
    dev = next(model.parameters()).device
    if floor is None:  # the model's own dtype decides (a model passed in may not be in ``dtype``)
        floor = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    if floor:
        from sparseattn.eval.bench_model import ALL_BLOCKS_SPEC
        from sparseattn.predictors.pattern import pattern_predictor

        rows.insert(0, (FLOOR_LABEL, pattern_predictor(ALL_BLOCKS_SPEC)))
    row_dense = {label: sorted(set(dense_layers)) for label, _ in rows}
    tuned_label = None
    if tuned is not None:
        pred, tcfg, tuned_label = tuned_predictor(tuned, model)
        label = f"tuned {tuned_label}"
        rows.append((label, pred))
        row_dense[label] = sorted(set(dense_layers) | set(tcfg.meta.get("dense_layers", ())))
    row_tail: dict[str, int] = {}
    base_rows, rows = rows, []
    for label, pred in base_rows:  # one configuration per (configuration, dense tail); the floor keeps all blocks
        for t in ([0] if label == FLOOR_LABEL else tails):
            lt = label if t == 0 else f"{label} + dense tail {t}"
            rows.append((lt, pred))
            row_dense[lt], row_tail[lt] = row_dense[label], t
    gen = {t: gen_tokens or DEFAULT_GEN_TOKENS[t] for t in task_list}
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max(lengths) + max(gen.values()) > max_pos:
        raise fail(fn, "lengths", "exceed the model's max_position_embeddings (with the generated tokens)",
                   f"<= {max_pos - max(gen.values())}", max(lengths))
    sentences, vocab, haystack = None, None, "RULER filler sentences (cwe: their words and pseudo-words)"
    if text_files or text_dir:
        from sparseattn.eval.texts import documents_for

        docs, haystack = documents_for(text_files, text_dir)
        docs = list(docs)
        sentences = _sentences(docs)
        vocab = _vocabulary(text for _, text in docs)
    configs = ["dense"] + [label for label, _ in rows]
    if len(set(configs)) != len(configs):
        raise fail(fn, "predictors/patterns", "repeat a configuration", "each spec once", configs)

    # the prompts first (they depend only on the seed, task, length and sample), then one patch per
    # configuration for all of them: patching per prompt would recapture the layer graphs every time
    cases: list[dict[str, Any]] = []
    prompts: list[Any] = []
    for n in lengths:
        for task in task_list:
            for s in range(samples):
                smp = make_ruler_sample(tokenizer, task, length=n, seed=f"{seed}-{s}", sentences=sentences,
                                        vocabulary=vocab)
                prompts.append(smp)
                cases.append({"task": task, "length": n, "sample": s, "prompt_tokens": smp["prompt_tokens"],
                              "query": smp["query"], "answers": smp["answers"], "meta": smp["meta"],
                              "outputs": {}, "scores": {}, "density": {}, "density_predicted": {},
                              "prefill_s": {}})
    runs_fh = None
    if runs_path is not None:  # one line per finished run, so an interrupted job keeps what it measured
        Path(runs_path).parent.mkdir(parents=True, exist_ok=True)
        runs_fh = open(runs_path, "a", encoding="utf-8")
    bar = tqdm(total=len(cases) * len(configs), desc="ruler", unit="run", disable=not progress)

    stops = _special_ids(tokenizer)

    if batch_size is None:
        batch_size = 8 if dev.type == "cuda" else 1
    groups: dict[tuple[int, str, int], list[int]] = {}  # same length, task and token count: one batch, no padding
    for i, case in enumerate(cases):
        groups.setdefault((case["length"], case["task"], case["prompt_tokens"]), []).append(i)
    batches = [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]

    def record(label: str, case: dict[str, Any], tokens: Sequence[int], density: float, prefill_s: float,
               batch: int, density_predicted: float | None) -> None:
        text = _continuation(tokenizer, tokens)
        case["outputs"][label] = text
        case["scores"][label] = string_match_all(text, case["answers"])
        case["density"][label] = density
        case["density_predicted"][label] = density_predicted
        case["prefill_s"][label] = prefill_s
        case.setdefault("batch", {})[label] = batch
        if runs_fh is not None:
            runs_fh.write(json.dumps({"config": label, "task": case["task"], "length": case["length"],
                                      "sample": case["sample"], "score": case["scores"][label],
                                      "density": density, "density_predicted": density_predicted, "batch": batch,
                                      "output": text}) + "\n")
            runs_fh.flush()
        bar.update(1)

    oom_warned: list[bool] = []

    def run_batch(label: str, idx: Sequence[int], handle: Any) -> None:
        """One batch; a batch the GPU has no memory for is run again as two halves (down to one prompt)."""
        if len(idx) == 1:
            return run_one_batch(label, idx, handle)
        try:
            return run_one_batch(label, idx, handle)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler (the failed batch's tensors are freed first)
        torch.cuda.empty_cache()
        if not oom_warned:
            oom_warned.append(True)
            warnings.warn(f"{fn}: a batch of {len(idx)} prompts of {cases[idx[0]]['length']} tokens ran out of GPU "
                          "memory; running such batches as halves (pass a smaller batch_size to avoid the retries)",
                          RuntimeWarning, stacklevel=2)
        half = len(idx) // 2
        run_batch(label, idx[:half], handle)
        run_batch(label, idx[half:], handle)

    def run_one_batch(label: str, idx: Sequence[int], handle: Any) -> None:
        first = cases[idx[0]]
        bar.set_postfix_str(f"{label[:24]}: {first['task']} @ {first['length']} x{len(idx)}", refresh=False)
        if handle is not None:
            handle.reset_stats()
        # scoring reads the continuation up to the first special token (``_continuation``): stop there too
        if len(idx) == 1:
            out = end_to_end.greedy_generate(model, prompts[idx[0]]["input_ids"].to(dev), gen_tokens=gen[first["task"]],
                                             score_last=1, stop_ids=stops)
            token_rows = [out["tokens"]]
        else:
            ids = torch.cat([prompts[i]["input_ids"] for i in idx]).to(dev)
            out = end_to_end.greedy_generate_batch(model, ids, gen_tokens=gen[first["task"]], stop_ids=stops)
            token_rows = out["tokens"]
        rep = None if handle is None else handle.sparsity_report()
        density = 1.0 if rep is None else rep["mean_density"]
        dens_pred = 1.0 if rep is None else rep["mean_density_predicted"]
        for i, tokens in zip(idx, token_rows):
            record(label, cases[i], tokens, density, out["prefill_s"] / len(idx), len(idx), dens_pred)

    try:
        with torch.no_grad():
            # one patch per sparse configuration; the dense run of each batch goes right before the first
            # sparse run of it (the model's own attention, handle.suspended()), so an interrupted job still
            # holds dense/sparse pairs
            for label in configs[1:]:
                handle = patch_model(model, predictor=dict(rows)[label], dense_layers=row_dense[label], backend=backend,
                                     dense_tail=row_tail[label])
                try:
                    for idx in batches:
                        if "dense" not in cases[idx[0]]["scores"]:
                            with handle.suspended():
                                run_batch("dense", idx, None)
                        run_batch(label, idx, handle)
                finally:
                    handle.unpatch()
    finally:
        if runs_fh is not None:
            runs_fh.close()
    bar.close()

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    scores = {c: {t: {str(n): mean([k["scores"][c] for k in cases if k["task"] == t and k["length"] == n])
                      for n in lengths} for t in task_list} for c in configs}
    dens = {c: [k["density"][c] for k in cases if k["density"][c] is not None] for c in configs}

    def sparsity(c: str, n: int | None = None, key: str = "density") -> float | None:
        """1 - the mean of the cases' ``key`` for configuration ``c`` (of length ``n`` if given); None if none ran."""
        v = [k[key][c] for k in cases if (n is None or k["length"] == n) and k[key].get(c) is not None]
        return 1.0 - mean(v) if v else None

    summary = {
        "mean_score": {c: mean([k["scores"][c] for k in cases]) for c in configs},
        "mean_score_by_length": {c: {str(n): mean([k["scores"][c] for k in cases if k["length"] == n]) for n in lengths}
                                 for c in configs},
        "mean_score_by_task": {c: {t: mean([k["scores"][c] for k in cases if k["task"] == t]) for t in task_list}
                               for c in configs},
        "density": {c: (mean(dens[c]) if dens[c] else None) for c in configs},
        "sparsity": {c: sparsity(c) for c in configs},
        "sparsity_by_length": {c: {str(n): sparsity(c, n) for n in lengths} for c in configs},
        # the layers a predictor chose blocks in (exact window bands and dense layers left out)
        "sparsity_predicted_layers": {c: sparsity(c, key="density_predicted") for c in configs},
        "sparsity_predicted_layers_by_length": {c: {str(n): sparsity(c, n, "density_predicted") for n in lengths}
                                                for c in configs},
        "same_score_as_dense": {c: mean([float(k["scores"][c] == k["scores"]["dense"]) for k in cases]) for c in configs},
        # paired difference to dense per task and length: mean and its standard error over the prompts
        "delta_vs_dense": {c: {t: {str(n): _paired(cases, c, t, n) for n in lengths} for t in task_list}
                           for c in configs[1:]},
        "delta_vs_floor": {c: {t: {str(n): _paired(cases, c, t, n, FLOOR_LABEL) for n in lengths} for t in task_list}
                           for c in configs if floor and c not in ("dense", FLOOR_LABEL)},
        "prefill_s": {c: mean([k["prefill_s"][c] for k in cases]) for c in configs},
        "total_s": time.perf_counter() - t0,
    }
    cfg = {"model": str(model_name), "configs": {label: describe_predictor(p) for label, p in rows}, "tuned": tuned_label,
           "dense_layers": sorted(dense_layers), "tasks": task_list, "samples": samples, "gen_tokens": gen,
           "batch_size": batch_size, "floor": bool(floor), "dense_tails": {c: t for c, t in row_tail.items() if t},
           "haystack": haystack, "backend": backend, "seed": seed, "scoring": "string_match_all (RULER)",
           "task_info": {t: TASK_INFO[t] for t in task_list}}
    return RulerResult(config=cfg, tasks=task_list, lengths=lengths, configs=configs, scores=scores, cases=cases,
                       summary=summary, environment=environment(dev))


def _paired(cases: Sequence[dict[str, Any]], config: str, task: str, length: int, ref: str = "dense") -> dict[str, float]:
    """Mean of ``score(config) - score(ref)`` over the prompts of one task and length, with its standard error
    (sample standard deviation / sqrt(n); 0 for one prompt) and n."""
    d = [k["scores"][config] - k["scores"][ref] for k in cases if k["task"] == task and k["length"] == length]
    if not d:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else 0.0
    return {"mean": m, "se": se, "n": len(d)}


# --------------------------------------------------------------------------- reports
def ruler_heatmap(res: RulerResult, path: str | Path, *, title: str = "") -> Path:
    """One panel per configuration (dense first): score per task (rows) × length (columns)."""
    from sparseattn.eval.plots import _plt, save_panels

    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(1, len(res.configs), squeeze=False,
                             figsize=(1.8 + (1.4 + 0.9 * len(res.lengths)) * len(res.configs), 1.4 + 0.45 * len(res.tasks)))
    im = None
    for col, (ax, c) in enumerate(zip(axes[0], res.configs)):
        data = np.array([[res.scores[c][t][str(n)] for n in res.lengths] for t in res.tasks], dtype=float)
        im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(res.lengths)), [str(n) for n in res.lengths])
        ax.set_yticks(range(len(res.tasks)), res.tasks if col == 0 else [""] * len(res.tasks))
        ax.set_xlabel("context length (tokens)")
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8)
        sp = res.summary["sparsity"][c]
        name = c if len(c) <= 34 else c[:31] + "..."
        ax.set_title(f"{name}\nmean {np.nanmean(data):.2f}" + ("" if c == "dense" or sp is None else f", sparsity {sp:.2f}"),
                     fontsize=8)
    return save_panels(plt, fig, im, axes, path, title, 1.06)


def _cell(s: str) -> str:
    return s.replace("\n", "⏎").replace("|", "¦").replace("`", "'")[:80]


def write_ruler_report(res: RulerResult, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``ruler.json``, ``ruler.md`` and ``ruler_heatmap.png`` into ``out_dir``."""
    from sparseattn.eval.plots import report_dir

    out, paths = report_dir("write_ruler_report", out_dir, plots,
                            lambda d: ruler_heatmap(res, d / "ruler_heatmap.png", title=f"RULER {res.config['model']}"))
    paths["json"] = out / "ruler.json"
    paths["json"].write_text(json.dumps(res.to_dict(), indent=2))
    s, cs = res.summary, res.configs
    md = ["# sparseattn ruler: dense vs sparse", "",
          f"- model `{res.config['model']}`; haystack: {res.config['haystack']}; {res.config['samples']} sample(s) per "
          f"task and length; seed {res.config['seed']}; dense layers {res.config['dense_layers'] or 'none'}; "
          f"batch size {res.config.get('batch_size', 1)} (prompts of one task, length and token count)",
          "- score: RULER's string_match_all, the share of expected answers found (case-insensitive) in the greedy "
          "continuation, averaged over samples (1.00 = all found)",
          f"- run {s['total_s']:.0f} s", "",
          "| task | length | " + " | ".join(f"`{c}`" for c in cs) + " |", "|---|---|" + "---|" * len(cs)]
    for t in res.tasks:
        for n in res.lengths:
            md.append(f"| {t} | {n} | " + " | ".join(f"{res.scores[c][t][str(n)]:.2f}" for c in cs) + " |")
    for n in res.lengths:
        md.append(f"| **mean** | {n} | " + " | ".join(f"**{s['mean_score_by_length'][c][str(n)]:.3f}**" for c in cs) + " |")
    md.append("| **mean** | all | " + " | ".join(f"**{s['mean_score'][c]:.3f}**" for c in cs) + " |")
    md += ["", "| configuration | mean score | score − dense | same score as dense | block sparsity | "
           + " | ".join(f"sparsity @ {n}" for n in res.lengths) + " | sparsity, predicted layers | "
           + " | ".join(f"predicted @ {n}" for n in res.lengths) + " | mean prefill s |",
           "|---|---|---|---|---|" + "---|" * (2 * len(res.lengths) + 1) + "---|"]

    def f3(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    spl = s.get("sparsity_predicted_layers", {})
    spl_n = s.get("sparsity_predicted_layers_by_length", {})
    for c in cs:
        md.append(f"| `{c}` | {s['mean_score'][c]:.3f} | {s['mean_score'][c] - s['mean_score']['dense']:+.3f} | "
                  f"{s['same_score_as_dense'][c]:.0%} | {f3(s['sparsity'][c])} | "
                  + " | ".join(f3(s["sparsity_by_length"][c][str(n)]) for n in res.lengths)
                  + f" | {f3(spl.get(c))} | " + " | ".join(f3(spl_n.get(c, {}).get(str(n))) for n in res.lengths)
                  + f" | {s['prefill_s'][c]:.3f} |")
    md += ["", "Block sparsity is over every attention layer (a model's exact sliding-window bands included); "
           "*predicted layers* counts only the layers whose blocks the configuration chose."]
    md += ["", "Score − dense per task and length, mean ± standard error of the paired difference over the prompts "
           "(one prompt of n moves a single-answer task by 1/n):", "",
           "| task | length | n | " + " | ".join(f"`{c}`" for c in cs[1:]) + " |", "|---|---|---|" + "---|" * (len(cs) - 1)]
    for t in res.tasks:
        for n in res.lengths:
            dd = [s["delta_vs_dense"][c][t][str(n)] for c in cs[1:]]
            md.append(f"| {t} | {n} | {dd[0]['n'] if dd else 0} | "
                      + " | ".join(f"{d['mean']:+.3f} ± {d['se']:.3f}" for d in dd) + " |")
    if s.get("delta_vs_floor"):
        fl = [c for c in cs if c in s["delta_vs_floor"]]
        md += ["", f"Score − `{FLOOR_LABEL}` (every causal block through sparseattn's kernel, same run: what the kernel's "
               "rounding alone changes), mean ± standard error over the prompts:", "",
               "| task | length | " + " | ".join(f"`{c}`" for c in fl) + " |", "|---|---|" + "---|" * len(fl)]
        for t in res.tasks:
            for n in res.lengths:
                md.append(f"| {t} | {n} | " + " | ".join(
                    f"{(d := s['delta_vs_floor'][c][t][str(n)])['mean']:+.3f} ± {d['se']:.3f}" for c in fl) + " |")
    md += ["", "Tasks:", ""] + [f"- `{t}`: {TASK_INFO[t]} ({res.config['gen_tokens'][t]} greedy tokens)" for t in res.tasks]
    if "heatmap" in paths:
        md += ["", f"![RULER heatmap]({paths['heatmap'].name})"]
    md += ["", "## Cases", "", "| task | length | sample | tokens | answers | " + " | ".join(f"`{c}`" for c in cs) + " |",
           "|---|---|---|---|---|" + "---|" * len(cs)]
    for k in res.cases:
        md.append(f"| {k['task']} | {k['length']} | {k['sample']} | {k['prompt_tokens']} | {_cell(', '.join(k['answers']))} | "
                  + " | ".join(f"{k['scores'][c]:.2f} `{_cell(k['outputs'][c])}`" for c in cs) + " |")
    paths["markdown"] = out / "ruler.md"
    paths["markdown"].write_text("\n".join(md) + "\n")
    return paths
