"""Readers for AVQA (R1-AQA's JSONL), MMAU, MMAR and the synthetic set -> list[Sample].

Readers never open audio: a missing clip is reported by the AudioLoader when it is loaded
(AudioError naming the file), or up front with `check_audio=True`.
Every bad record is a DataError naming the file and the line (JSONL) or item index (JSON list);
with on_error="skip" it is dropped and counted in one logged warning. Nothing is dropped silently.
A repeated id is a bad record (the second one), and so, with ``unique_choices=True`` (training
questions, where the accuracy reward and the warm-up treat choices as distinct), is a question
that lists the same choice twice. A UTF-8 byte-order mark at the start of a file is accepted.
"""

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from data.quote import cut, quote

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
_MAX_REASONS = 5  # reasons quoted in the skip warning
_MAX_PATH = 4096  # PATH_MAX on Linux: an audio path longer than that names no file


class DataError(ValueError):
    """Bad dataset input; the message names the file and the line or item."""


@dataclass(frozen=True)
class Sample:
    id: str
    audio_path: str  # absolute
    question: str  # as shown to the model (AVQA: "video" -> "audio")
    choices: list[str]
    answer: str | None  # the correct choice's text; None when the set has no answers
    task: str | None
    meta: dict = field(default_factory=dict, repr=False)  # the source record, untouched
    source: str = field(default="", repr=False, compare=False)  # "<file>: line <n>" (or "item <i>")

    @property
    def where(self) -> str:
        """The sample in words for messages: its file and line, and its id."""
        return f"{self.source}: sample {quote(self.id)}" if self.source else f"sample {quote(self.id)}"


class _Bad(Exception):
    """A record-level problem; turned into DataError with the location attached."""


# ---------------------------------------------------------------- file -> records


def _iter_records(path):
    """Yield (location, record) from a JSON list or JSON Lines file (sniffed by first char).

    A malformed JSONL line yields (location, _Bad) so on_error="skip" can skip it; a malformed
    JSON list cannot be partly read and always raises.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: files saved by Windows tools start with a BOM
            text = f.read()
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None
    if text.lstrip()[:1] == "[":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON: {e.msg}") from e
        except ValueError as e:  # an integer longer than Python's digit limit
            raise DataError(f"{path}: malformed JSON: {cut(e)}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to be a list of records") from None
        for i, rec in enumerate(items):
            yield f"{path}: item {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}: line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}: line {lineno}", _Bad(f"malformed JSON: {e.msg}")
        except ValueError as e:  # an integer longer than Python's digit limit
            yield f"{path}: line {lineno}", _Bad(f"malformed JSON: {cut(e)}")
        except RecursionError:
            yield f"{path}: line {lineno}", _Bad("JSON nested too deeply")


def _read(path, parse, on_error, check_audio=False):
    """Parse each record with `parse(rec) -> Sample`; raise or skip-and-count bad ones."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = os.fspath(path)
    samples, skipped, n_records = [], [], 0
    first_seen = {}  # id -> where it first appeared
    for loc, rec in _iter_records(path):
        n_records += 1
        try:
            if isinstance(rec, _Bad):
                raise rec
            if not isinstance(rec, dict):
                raise _Bad(f"record is a {type(rec).__name__}, not an object")
            sample = parse(rec)
            if sample.id in first_seen:
                raise _Bad(f"duplicate id {quote(sample.id)} (first at {first_seen[sample.id]})")
            first_seen[sample.id] = loc.removeprefix(f"{path}: ")
            sample = dataclasses.replace(sample, source=loc)
        except _Bad as e:
            if on_error == "raise":
                raise DataError(f"{loc}: {e}") from None
            skipped.append(f"{loc}: {e}")
            continue
        samples.append((loc, sample))
    if n_records == 0:
        raise DataError(f"{path}: no records")
    if check_audio:  # all missing files in one report, not just the first
        missing = [f"{loc}: sample {quote(s.id)}: audio file not found: {s.audio_path}"
                   for loc, s in samples if not os.path.isfile(s.audio_path)]
        if missing and on_error == "raise":
            raise DataError(f"{path}: {len(missing)} of {len(samples)} audio files not found; "
                            "first:\n  " + "\n  ".join(missing[:_MAX_REASONS]))
        skipped += missing
        samples = [(loc, s) for loc, s in samples if os.path.isfile(s.audio_path)]
    samples = [s for _, s in samples]
    if skipped:
        logger.warning("%s: skipped %d of %d records; first reasons:\n  %s", path, len(skipped),
                       n_records, "\n  ".join(skipped[:_MAX_REASONS]))
    return samples


# ---------------------------------------------------------------- field checks


def _get(rec, key):
    if key not in rec:
        raise _Bad(f"missing field {key!r}")
    return rec[key]


def _str(rec, key):
    v = _get(rec, key)
    if not isinstance(v, str):
        raise _Bad(f"field {key!r} must be a string, got {type(v).__name__}")
    return v


def _id(rec):
    v = _get(rec, "id")
    if isinstance(v, bool) or not isinstance(v, (str, int)):  # raw AVQA ids are ints
        raise _Bad(f"field 'id' must be a string or int, got {type(v).__name__}")
    return str(v)


def _choices(rec, key, unique=False):
    v = _get(rec, key)
    if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
        raise _Bad(f"field {key!r} must be a non-empty list of strings, got {quote(v)}")
    if unique and len(set(v)) != len(v):
        repeated = sorted(c for c, n in Counter(v).items() if n > 1)
        raise _Bad(f"field {key!r} lists the same choice twice ({', '.join(map(quote, repeated[:5]))}): {quote(v)}")
    return list(v)


def _answer_text(rec, choices):
    """Benchmark answers are choice texts; absent or null (MMAU test) -> None."""
    a = rec.get("answer")
    if a is None:
        return None
    if not isinstance(a, str):
        raise _Bad(f"field 'answer' must be a string, got {type(a).__name__}")
    if a not in choices:
        raise _Bad(f"answer {quote(a)} is not among choices {quote(choices)}")
    return a


def _resolve(audio_path, root):
    """Relative paths are resolved against `root`; the result is absolute and normalised."""
    if not isinstance(audio_path, str) or not audio_path:
        raise _Bad(f"audio path must be a non-empty string, got {quote(audio_path)}")
    if len(audio_path) > _MAX_PATH or "\0" in audio_path:  # what no file system can open
        raise _Bad(f"audio path {quote(audio_path)} ({len(audio_path)} characters) is not a file path")
    return os.path.abspath(os.path.join(root, audio_path))


# ---------------------------------------------------------------- readers

# R1-AQA does question_text.replace("video", "audio"); we replace at word starts only (so
# "videos" -> "audios" too, but never inside another word) and also the capitalised form.
_VIDEO = re.compile(r"\b([Vv])ideo")


def video_to_audio(question):
    return _VIDEO.sub(lambda m: "Audio" if m.group(1) == "V" else "audio", question)


def read_avqa(path, *, audio_root=None, on_error="raise", check_audio=False, unique_choices=False):
    """R1-AQA's AVQA JSONL (also the synthetic set). Relative audio_path: against audio_root,
    or else the JSONL's directory. answer is a 0-based index into multi_choice."""
    root = os.fspath(audio_root) if audio_root is not None else os.path.dirname(os.path.abspath(path))

    def parse(rec):
        sid = _id(rec)
        question = _str(rec, "question_text")
        choices = _choices(rec, "multi_choice", unique_choices)
        idx = _get(rec, "answer")
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise _Bad(f"field 'answer' must be an int index, got {quote(idx)}")
        if not 0 <= idx < len(choices):
            raise _Bad(f"answer index {quote(idx)} out of range for {len(choices)} choices")
        return Sample(id=sid, audio_path=_resolve(_get(rec, "audio_path"), root),
                      question=video_to_audio(question), choices=choices, answer=choices[idx],
                      task=rec.get("task") or rec.get("question_type"), meta=rec)

    return _read(path, parse, on_error, check_audio)


def _read_benchmark(path, audio_root, on_error, check_audio, unique_choices, *, audio_key, task_key):
    """A benchmark file with `question`, `choices`, an answer, an audio path under `audio_key`
    (relative to audio_root, default the file's directory) and the task under `task_key`."""
    root = os.fspath(audio_root) if audio_root is not None else os.path.dirname(os.path.abspath(path))

    def parse(rec):
        choices = _choices(rec, "choices", unique_choices)
        return Sample(id=_id(rec), audio_path=_resolve(_get(rec, audio_key), root),
                      question=_str(rec, "question"), choices=choices,
                      answer=_answer_text(rec, choices), task=rec.get(task_key), meta=rec)

    return _read(path, parse, on_error, check_audio)


def read_mmau(path, *, audio_root=None, on_error="raise", check_audio=False, unique_choices=False):
    """MMAU JSON list. Audio is audio_root / audio_id ("./test-mini-audios/<id>.wav");
    audio_root defaults to the JSON file's directory. No answer (MMAU test) -> answer None."""
    return _read_benchmark(path, audio_root, on_error, check_audio, unique_choices, audio_key="audio_id",
                           task_key="task")


def read_mmar(path, *, audio_root=None, on_error="raise", check_audio=False, unique_choices=False):
    """MMAR (JSONL, or the JSON list MMAR-meta.json). task = modality."""
    return _read_benchmark(path, audio_root, on_error, check_audio, unique_choices, audio_key="audio_path",
                           task_key="modality")


READERS = {"avqa": read_avqa, "mmau": read_mmau, "mmar": read_mmar, "synthetic": read_avqa}
FORMATS = tuple(READERS)  # the values of data.format


def read_dataset(format, path, *, audio_root=None, on_error="raise", check_audio=False, unique_choices=False):
    if format not in READERS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {sorted(READERS)}")
    return READERS[format](path, audio_root=audio_root, on_error=on_error, check_audio=check_audio,
                           unique_choices=unique_choices)
