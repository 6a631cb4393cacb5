"""Kaldi-style data directories: read and write ``wav.scp``, ``text``, ``utt2spk``, ``segments``.

A data directory lists utterances, one per line in each file, keyed by an id::

    wav.scp    <reco_id> <path>              (or a pipe such as ``sph2pipe -f wav -p -c 1 x.sph |``)
    text       <utt_id> <transcript>
    utt2spk    <utt_id> <speaker>            (optional; speaker = utt_id when absent)
    segments   <utt_id> <reco_id> <start> <end>   (optional; seconds, end -1 = end of file)

Without ``segments`` the wav.scp keys are the utterance ids.

Relative audio paths are tried first against the data directory and then against its parent,
because corpora such as speechocean762 ship ``train/wav.scp`` with paths like
``audio/SPEAKER0001/x.opus`` that are relative to the corpus root.

Pipe commands are never executed: only the common ``sph2pipe``, ``flac -c -d -s`` and
``sox ... remix N`` forms are parsed into a file path and a channel, and libsndfile reads
the file itself.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from allinone.utils import atomic_open

logger = logging.getLogger("allinone")

# When ``read_data_dir`` fails, show at most this many problems in the error message.
_MAX_LISTED_PROBLEMS = 5


class DataError(ValueError):
    """Bad input data: a malformed file, a missing or unreadable recording, an empty transcript."""


@dataclass
class Utterance:
    """One utterance of a data directory.

    ``start`` / ``end`` are seconds inside the recording (``None``: from the start / to the end);
    ``channel`` is a 0-based channel index (``None``: mix all channels down to mono).
    """

    utt_id: str
    path: str
    text: str
    speaker: str
    start: float | None = None
    end: float | None = None
    channel: int | None = None


class UtteranceList(list):
    """A ``list[Utterance]`` that also records what was skipped.

    ``skipped`` holds ``(utt_id, reason)`` pairs for every utterance dropped by ``skip_bad=True``,
    so that nothing disappears silently.
    """

    def __init__(self, utts: Iterable[Utterance] = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(utts)
        self.skipped: list[tuple[str, str]] = list(skipped)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_table(path: Path, allow_empty_value: bool = False) -> dict[str, str]:
    """Read ``<id> <rest of line>`` lines into a dict, in file order.

    Blank lines are ignored. A line with no value (unless ``allow_empty_value``) or a repeated id
    raises ``DataError`` naming the file and the line number.
    """
    table: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(maxsplit=1)
            key = fields[0]
            value = fields[1].strip() if len(fields) > 1 else ""
            if not value and not allow_empty_value:
                raise DataError(f"{path}:{lineno}: malformed line {line!r}: expected '<id> <value>'")
            if key in table:
                raise DataError(f"{path}:{lineno}: duplicate id {key!r}")
            table[key] = value
    return table


def read_text(path: str | os.PathLike, allow_empty: bool = False) -> dict[str, str]:
    """A Kaldi ``text`` file (``<utt id> <words>``) as ``{utt id: words}``, whitespace normalised
    as ``read_data_dir`` reads transcripts; ``allow_empty``: lines with an id alone (an empty
    hypothesis) are kept as "". A malformed line or a repeated id is a ``DataError``."""
    return {k: " ".join(v.split()) for k, v in _read_table(Path(path), allow_empty).items()}


def _read_segments(path: Path) -> dict[str, tuple[str, float, float | None]]:
    """Read ``segments``: ``seg_id -> (reco_id, start, end)``; an end of -1 means end of file."""
    segments: dict[str, tuple[str, float, float | None]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 4:
                raise DataError(f"{where}: malformed line {line.strip()!r}: "
                                "expected '<seg_id> <reco_id> <start> <end>'")
            seg_id, reco_id = fields[0], fields[1]
            try:
                start, end = float(fields[2]), float(fields[3])
            except ValueError:
                raise DataError(f"{where}: malformed line {line.strip()!r}: start and end must be numbers") from None
            if seg_id in segments:
                raise DataError(f"{where}: duplicate id {seg_id!r}")
            # Kaldi's extract-segments reads an end of -1 as "to the end of the recording".
            end_or_none = None if end == -1 else end
            if start < 0 or (end_or_none is not None and end_or_none <= start):
                raise DataError(f"{where}: segment {seg_id!r} has start={start}, end={end}: "
                                "expected 0 <= start < end (or end = -1)")
            segments[seg_id] = (reco_id, start, end_or_none)
    return segments


def parse_wav_entry(value: str, where: str = "wav.scp") -> tuple[str, int | None]:
    """Turn the value of a ``wav.scp`` line into ``(path, channel)``; nothing is executed.

    Accepted forms::

        /data/a.wav                                  -> ("/data/a.wav", None)
        sph2pipe -f wav -p -c 2 /data/a.sph |        -> ("/data/a.sph", 1)
        flac -c -d -s /data/a.flac |                 -> ("/data/a.flac", None)
        sox /data/a.wav -t wav - remix 2 |           -> ("/data/a.wav", 1)

    ``channel`` is 0-based (Kaldi tools count channels from 1).
    """
    if not value.endswith("|"):
        return value, None
    try:
        tokens = shlex.split(value[:-1])
    except ValueError as e:
        raise DataError(f"{where}: cannot parse pipe command {value!r}: {e}") from None
    if not tokens:
        raise DataError(f"{where}: empty pipe command {value!r}")
    program = os.path.basename(tokens[0])
    if program == "sph2pipe":
        return _parse_sph2pipe(tokens[1:], value, where)
    if program == "flac" and len(tokens) >= 2 and set(tokens[1:-1]) <= {"-c", "-d", "-s"}:
        return tokens[-1], None
    if program == "sox" and len(tokens) >= 2:
        return _parse_sox(tokens[1:], value, where)
    raise DataError(f"{where}: unsupported pipe command {value!r}: only sph2pipe, 'flac -c -d -s' and "
                    "'sox <file> -t wav - remix N' are understood (commands are never executed)")


def _parse_sph2pipe(args: list[str], value: str, where: str) -> tuple[str, int | None]:
    """Parse ``sph2pipe [-f fmt] [-p] [-c N] file`` (the part after the program name)."""
    channel = None
    paths = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-c" and i + 1 < len(args):
            try:
                channel = int(args[i + 1]) - 1
            except ValueError:
                raise DataError(f"{where}: bad channel in {value!r}") from None
            i += 2
        elif arg in ("-f", "-t", "-s") and i + 1 < len(args):
            i += 2  # options that take a value; output format and sample ranges don't matter here
        elif arg.startswith("-"):
            i += 1
        else:
            paths.append(arg)
            i += 1
    if len(paths) != 1 or (channel is not None and channel < 0):
        raise DataError(f"{where}: cannot parse sph2pipe command {value!r}")
    return paths[0], channel


def _parse_sox(args: list[str], value: str, where: str) -> tuple[str, int | None]:
    """Parse ``sox file -t wav - [remix N]``, the form ``write_data_dir`` emits for a channel."""
    path, rest = args[0], args[1:]
    channel = None
    if "remix" in rest:
        k = rest.index("remix")
        try:
            channel = int(rest[k + 1]) - 1
        except (IndexError, ValueError):
            raise DataError(f"{where}: cannot parse sox command {value!r}") from None
    if rest[:3] != ["-t", "wav", "-"] and rest[:2] != ["-t", "wav"]:
        raise DataError(f"{where}: unsupported sox command {value!r}")
    return path, channel


def _resolve_audio(path: str, data_dir: Path) -> Path | None:
    """Find an audio file: absolute, else relative to the data dir, else relative to its parent."""
    p = Path(path)
    if p.is_absolute():
        return p if p.is_file() else None
    for base in (data_dir, data_dir.parent):
        if (base / p).is_file():
            return base / p
    return None


def read_data_dir(path: str | os.PathLike, skip_bad: bool = False) -> UtteranceList:
    """Read a Kaldi data directory into a list of utterances, sorted by id.

    Args:
        path: the data directory (holding ``wav.scp`` and ``text``).
        skip_bad: if True, an utterance with a problem (no audio entry, no transcript, empty
            transcript, missing audio file, no speaker) is logged and skipped instead of raising.
            Skipped ids and reasons are in the returned list's ``skipped`` attribute.
            Malformed files always raise: a broken file cannot be trusted line by line.

    Returns:
        ``UtteranceList`` (a ``list[Utterance]`` with ``.skipped: list[(utt_id, reason)]``).

    Raises:
        DataError: naming the file (and line) or the utterance id and what was expected.
    """
    data_dir = Path(path)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    for name in ("wav.scp", "text"):
        if not (data_dir / name).is_file():
            raise DataError(f"data directory {data_dir} has no {name}")

    wav_scp = _read_table(data_dir / "wav.scp")
    texts = _read_table(data_dir / "text", allow_empty_value=True)
    utt2spk = _read_table(data_dir / "utt2spk") if (data_dir / "utt2spk").is_file() else None
    segments = _read_segments(data_dir / "segments") if (data_dir / "segments").is_file() else None

    if not wav_scp and not texts:
        raise DataError(f"data directory {data_dir} lists no utterances (wav.scp and text are empty)")
    problems: dict[str, str] = {}
    # With segments, utterances are segment ids pointing at recordings; otherwise the
    # wav.scp keys are the utterance ids themselves.
    if segments is not None:
        audio_ids = set(segments)
        audio_file = data_dir / "segments"
        for seg_id, (reco_id, _, _) in segments.items():
            if reco_id not in wav_scp:
                problems[seg_id] = f"recording {reco_id!r} of segment {seg_id!r} is not in {data_dir / 'wav.scp'}"
    else:
        audio_ids = set(wav_scp)
        audio_file = data_dir / "wav.scp"

    for utt_id in texts.keys() - audio_ids:
        problems.setdefault(utt_id, f"utterance {utt_id!r} is in {data_dir / 'text'} but not in {audio_file}")
    for utt_id in audio_ids - texts.keys():
        problems.setdefault(utt_id, f"utterance {utt_id!r} is in {audio_file} but not in {data_dir / 'text'}")

    utts = []
    for utt_id in sorted(texts.keys() & audio_ids):
        if utt_id in problems:
            continue
        utt, problem = _make_utterance(utt_id, data_dir, wav_scp, texts, utt2spk, segments)
        if problem is not None:
            problems[utt_id] = problem
        else:
            utts.append(utt)

    if problems and not skip_bad:
        listed = [problems[k] for k in sorted(problems)[:_MAX_LISTED_PROBLEMS]]
        more = len(problems) - len(listed)
        msg = f"{len(problems)} bad utterance(s) in {data_dir}:\n  " + "\n  ".join(listed)
        if more:
            msg += f"\n  ... and {more} more"
        raise DataError(msg + "\n(allinone decode --skip-bad, or skip_bad=True in Python, logs and skips them)")
    for utt_id in sorted(problems):
        logger.warning("skipping utterance %s: %s", utt_id, problems[utt_id])
    if problems:
        logger.warning("skipped %d of %d utterances in %s", len(problems), len(problems) + len(utts), data_dir)
    return UtteranceList(utts, sorted(problems.items()))


def _make_utterance(utt_id, data_dir, wav_scp, texts, utt2spk, segments) -> tuple[Utterance | None, str | None]:
    """Build one ``Utterance``; return ``(None, reason)`` if it is bad."""
    text = " ".join(texts[utt_id].split())
    if not text:
        return None, f"utterance {utt_id!r} has an empty transcript in {data_dir / 'text'}"
    if utt2spk is None:
        speaker = utt_id
    elif utt_id in utt2spk:
        speaker = utt2spk[utt_id]
    else:
        return None, f"utterance {utt_id!r} has no speaker in {data_dir / 'utt2spk'}"

    start = end = None
    reco_id = utt_id
    if segments is not None:
        reco_id, start, end = segments[utt_id]
    raw_path, channel = parse_wav_entry(wav_scp[reco_id], where=f"{data_dir / 'wav.scp'} ({reco_id})")
    resolved = _resolve_audio(raw_path, data_dir)
    if resolved is None:
        tried = raw_path if Path(raw_path).is_absolute() else f"{data_dir / raw_path} or {data_dir.parent / raw_path}"
        return None, f"utterance {utt_id!r}: audio file not found: {tried}"
    return Utterance(utt_id, str(resolved), text, speaker, start, end, channel), None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _path_for_scp(path: str, out_dir: Path) -> str:
    """Write paths under ``out_dir`` relative to it (portable), other paths absolute."""
    p = Path(path).absolute()
    try:
        return str(p.relative_to(out_dir.absolute()))
    except ValueError:
        return str(p)


def _wav_entry(path: str, channel: int | None) -> str:
    """The wav.scp value for a file and an optional 0-based channel (see ``parse_wav_entry``)."""
    if channel is None:
        return path
    if path.lower().endswith(".sph"):
        return f"sph2pipe -f wav -p -c {channel + 1} {shlex.quote(path)} |"
    return f"sox {shlex.quote(path)} -t wav - remix {channel + 1} |"


def _recording_ids(utts: list[Utterance]) -> dict[tuple[str, int | None], str]:
    """Name each distinct (path, channel) for ``segments``: the file stem, made unique."""
    names: dict[tuple[str, int | None], str] = {}
    used: set[str] = set()
    for utt in sorted(utts, key=lambda u: u.utt_id):
        key = (utt.path, utt.channel)
        if key in names:
            continue
        base = Path(utt.path).stem + ("" if utt.channel is None else f"-c{utt.channel + 1}")
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names[key] = name
    return names


def write_data_dir(utts: Iterable[Utterance], out_dir: str | os.PathLike) -> None:
    """Write ``wav.scp``, ``text``, ``utt2spk``, ``spk2utt`` (and ``segments`` if any utterance
    has a start or end) to ``out_dir``, sorted by id, each file written atomically.

    Audio paths under ``out_dir`` are written relative to it; others are written absolute.
    """
    out_dir = Path(out_dir)
    utts = sorted(utts, key=lambda u: u.utt_id)
    ids = [u.utt_id for u in utts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(f"cannot write {out_dir}: duplicate utterance ids {dup[:5]}")
    for u in utts:
        if not u.text.strip():
            raise DataError(f"cannot write {out_dir}: utterance {u.utt_id!r} has an empty transcript")
        if any(c.isspace() for c in u.utt_id + u.speaker):
            raise DataError(f"cannot write {out_dir}: id {u.utt_id!r} / speaker {u.speaker!r} contains whitespace")
    out_dir.mkdir(parents=True, exist_ok=True)

    use_segments = any(u.start is not None or u.end is not None for u in utts)
    if use_segments:
        recos = _recording_ids(utts)
        wav_lines = sorted({f"{name} {_wav_entry(_path_for_scp(p, out_dir), ch)}" for (p, ch), name in recos.items()})
        seg_lines = [f"{u.utt_id} {recos[(u.path, u.channel)]} {u.start or 0.0:.3f} "
                     f"{-1 if u.end is None else format(u.end, '.3f')}" for u in utts]
        _write_lines(out_dir / "segments", seg_lines)
    else:
        wav_lines = [f"{u.utt_id} {_wav_entry(_path_for_scp(u.path, out_dir), u.channel)}" for u in utts]
        if (out_dir / "segments").exists():
            # A stale segments file would reinterpret the new wav.scp keys.
            (out_dir / "segments").unlink()

    spk2utt: dict[str, list[str]] = defaultdict(list)
    for u in utts:
        spk2utt[u.speaker].append(u.utt_id)
    _write_lines(out_dir / "wav.scp", wav_lines)
    _write_lines(out_dir / "text", [f"{u.utt_id} {' '.join(u.text.split())}" for u in utts])
    _write_lines(out_dir / "utt2spk", [f"{u.utt_id} {u.speaker}" for u in utts])
    _write_lines(out_dir / "spk2utt", [f"{spk} {' '.join(spk2utt[spk])}" for spk in sorted(spk2utt)])


def _write_lines(path: Path, lines: list[str]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
