"""Raw AVQA train_qa.json + a folder of VGGSound wavs -> R1-AQA's AVQA JSONL.

Each output line is the raw record plus dataset_name "AVQA" and audio_path, a 16 kHz mono
wav: a clip at another rate or with more channels is converted once (its first channel, as
R1-AQA reads it, resampled) into ``--converted-dir`` (default ``<output>.16k/``), and the
line points there; the count and an example are reported. Questions whose clip is missing
are left out and reported (count + examples); an undecodable clip stops with its name. The
output is written to a temp file and renamed, so a partial file never appears.

    python scripts/prepare_avqa.py --qa train_qa.json --audio-dir wavs/ --output avqa_train.jsonl

Audio names: video "-HG3Omg_89c_000030" -> "-HG3Omg_89c_30.wav" (the trailing 6-digit start
time, as an int; the YouTube id before it may itself contain '_' and '-').
"""

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/prepare_avqa.py` from anywhere
from data.audio import AudioError, load_audio  # noqa: E402

SAMPLING_RATE = 16000  # what Qwen2-Audio's feature extractor takes

logger = logging.getLogger("prepare_avqa")

REQUIRED = ("id", "video_name", "question_text", "multi_choice", "answer")
_VIDEO_NAME = re.compile(r"^(?P<yt>.+)_(?P<start>\d{6})$")
_MAX_EXAMPLES = 5


class PrepareError(ValueError):
    """Bad input; the message names the file (and the item)."""


def wav_name(video_name):
    """'-HG3Omg_89c_000030' -> '-HG3Omg_89c_30.wav'; '..._000000' -> '..._0.wav'."""
    m = _VIDEO_NAME.match(video_name) if isinstance(video_name, str) else None
    if m is None:
        raise ValueError(f"video_name {video_name!r} does not end in _<6-digit start time>")
    return f"{m['yt']}_{int(m['start'])}.wav"


def _check(rec):
    if not isinstance(rec, dict):
        raise ValueError(f"record is a {type(rec).__name__}, not an object")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"missing fields {missing}")
    choices, ans = rec["multi_choice"], rec["answer"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"multi_choice must be a non-empty list of strings, got {choices!r}")
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise ValueError(f"answer {ans!r} is not an index into {len(choices)} choices")


def as_16k_mono(path, converted_dir):
    """``path`` if it is a 16 kHz mono wav, else the path of its 16 kHz mono copy in
    ``converted_dir`` (written once) and the original's (rate, channels); PrepareError when
    the clip cannot be decoded."""
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile's errors on a file that is not audio
        raise PrepareError(f"{path}: cannot decode audio ({type(e).__name__}: {e})") from None
    if info.samplerate == SAMPLING_RATE and info.channels == 1:
        return path, None
    target = os.path.join(converted_dir, os.path.basename(path))
    if not os.path.isfile(target):
        try:
            wave = load_audio(path, sampling_rate=SAMPLING_RATE, channel="first")
        except AudioError as e:
            raise PrepareError(str(e)) from None
        os.makedirs(converted_dir, exist_ok=True)
        sf.write(f"{target}.tmp.wav", wave, SAMPLING_RATE, subtype="PCM_16")
        os.replace(f"{target}.tmp.wav", target)
    return target, (info.samplerate, info.channels)


def convert(qa_path, audio_dir, output, *, relative_paths=False, progress=True, converted_dir=None):
    """Write the JSONL; return (n_written, missing) where missing lists (video_name, wav) pairs.

    Clips not at 16 kHz mono are converted into ``converted_dir`` (default ``<output>.16k``)."""
    try:
        with open(qa_path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise PrepareError(f"{qa_path}: file not found") from None
    except json.JSONDecodeError as e:
        raise PrepareError(f"{qa_path}: line {e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(records, list):
        raise PrepareError(f"{qa_path}: expected a JSON list of questions, got {type(records).__name__}")
    if not os.path.isdir(audio_dir):
        raise PrepareError(f"{audio_dir}: audio directory not found")
    available = set(os.listdir(audio_dir))  # one listing instead of 40k stat calls
    out_dir = os.path.dirname(os.path.abspath(output))
    converted_dir = os.path.abspath(converted_dir or f"{output}.16k")
    lines, missing, converted = [], [], []
    for i, rec in enumerate(tqdm(records, desc="AVQA", disable=not progress)):
        try:
            _check(rec)
            wav = wav_name(rec["video_name"])
        except ValueError as e:
            raise PrepareError(f"{qa_path}: item {i}: {e}") from None
        if wav not in available:
            missing.append((rec["video_name"], wav))
            continue
        path, original = as_16k_mono(os.path.abspath(os.path.join(audio_dir, wav)), converted_dir)
        if original is not None:
            converted.append((wav, *original))
        if relative_paths:  # relative to the JSONL's folder, as data.datasets.read_avqa resolves them
            path = os.path.relpath(path, out_dir)
        lines.append(json.dumps({**rec, "dataset_name": "AVQA", "audio_path": path}, ensure_ascii=False))
    if missing:
        logger.warning("%d of %d questions have no audio in %s and are left out; e.g.\n  %s",
                       len(missing), len(records), audio_dir,
                       "\n  ".join(f"{v} -> {w}" for v, w in missing[:_MAX_EXAMPLES]))
    if converted:
        wav, rate, channels = converted[0]
        logger.warning("%d clips were not 16 kHz mono (e.g. %s: %d Hz, %d channel(s)): converted to %s (the first "
                       "channel, resampled), and their lines point there", len(converted), wav, rate, channels,
                       converted_dir)
    if not lines:
        raise PrepareError(f"{qa_path}: none of {len(records)} questions has audio in {audio_dir}")
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, output)
    logger.info("wrote %d questions to %s", len(lines), output)
    return len(lines), missing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qa", required=True, help="raw AVQA train_qa.json (a JSON list)")
    p.add_argument("--audio-dir", required=True, help="folder of <youtube id>_<start>.wav clips")
    p.add_argument("--output", required=True, help="JSONL to write")
    p.add_argument("--relative-paths", action="store_true",
                   help="write audio_path relative to the output file's folder (default: absolute)")
    p.add_argument("--converted-dir", default=None,
                   help="where clips not at 16 kHz mono are converted to (default: <output>.16k)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        n, missing = convert(args.qa, args.audio_dir, args.output, relative_paths=args.relative_paths,
                             converted_dir=args.converted_dir)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {n} questions to {args.output}; {len(missing)} without audio left out")


if __name__ == "__main__":
    main()
