"""Switchboard-1 (LDC97S62), Hub5'00 eval2000 (LDC2002S09 + LDC2002T43) and RT03 (LDC2007S10):
Kaldi data directories, text normalisation, CTM files and hubscr scoring inputs.

Called by ``egs/swbd/asr1/local/*.sh`` through ``python -m allinone.data.swbd <command>``.

Layouts read
------------
* **Switchboard-1** audio: ``<swbd>/**/sw0NNNN.sph``, two-channel 8 kHz SPHERE (one side per
  channel: A = channel 1, B = channel 2). Transcripts: the Mississippi State (ms98) release
  ``swb_ms98_transcriptions/<NN>/<NNNN>/swNNNN{A,B}-ms98-a-trans.text``, one segment a line::

      sw2001A-ms98-a-0002 0.977625 11.561375 hi um yeah i'd like to talk about how you dress for work

* **eval2000 / RT03**: audio ``*.sph`` anywhere under the speech root (eval2000:
  ``hub5e_00/english/{en_NNNN,sw_NNNN}.sph``), references in an STM file (eval2000:
  LDC2002T43 ``reference/hub5e00.english.000405.stm``) and the GLM word-mapping file NIST
  scores with (``reference/en20000405_hub5.glm``; RT03: ``*.glm`` of the release)::

      en_4156 A en_4156_A 301.85 302.48 <O,en,F,en-F> oh yeah (%hesitation)

Kaldi naming is kept: recording ``sw02001-A`` (conversation-side), utterance
``sw02001-A_000098-001156`` (start / end in centiseconds), speaker = recording.
``wav.scp`` holds ``sph2pipe -f wav -p -c N file.sph |``, which ``read_data_dir`` parses
without running it (libsndfile reads the SPHERE file; shorten-compressed files must be
decompressed with sph2pipe first).

Switchboard training text normalisation (``normalize_swbd``), applied in this order
----------------------------------------------------------------------------------
1. ``[word1/word2]`` (mispronunciation: said word1, meant word2) -> ``word2``.
2. ``[laughter-word]`` (a word spoken laughing) -> ``word``; likewise ``[noise-word]``.
3. Partial words keep the spoken part and the hyphen: ``wh[at]-`` -> ``wh-``,
   ``-[th]at`` -> ``-at``.
4. Non-speech tags are removed: ``[silence]``, ``[noise]``, ``[laughter]``,
   ``[vocalized-noise]`` and any other ``[...]`` left.
5. ``{word}`` (coinages, unusual words) -> ``word``; ``<b_aside>``, ``<e_aside>`` and other
   ``<...>`` markers are removed.
6. The alternate-pronunciation suffix ``_1`` is removed (``okay_1`` -> ``okay``).
7. Upper case, whitespace collapsed. A segment left empty (silence or noise only) is dropped.

Reference text of eval2000 / RT03 (``normalize_stm``): ``<B_ASIDE>``/``<E_ASIDE>`` removed,
optionally deletable words ``(word)`` / ``((word))`` unbracketed, then the scoring filter below.

Scoring filter (``scoring_filter``; applied to hypotheses before hubscr, as ESPnet and Kaldi do,
and to both sides of our own approximate scoring): hesitations ``UH UM EH MM HM AH HUH HA ER
OOF HEE ACH EEE EW`` and ``%HESITATION``, partial words (leading or trailing ``-``), ``[...]``
tags and ``<UNK>`` are removed. With the GLM, NIST's hubscr applies the official mappings
(contractions, spellings, optional deletions); without it, our WER on the filtered text is an
approximation of the official number (usually within a few tenths, not comparable to papers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

from allinone.data.kaldi import DataError, read_data_dir
from allinone.utils import atomic_open

logger = logging.getLogger("allinone")

HESITATIONS = frozenset("UH UM EH MM HM AH HUH HA ER OOF HEE ACH EEE EW %HESITATION".split())

_MS98_LINE = re.compile(r"^sw(\d{4,5})([AB])-ms98-a-\d+$")
_SPH_SW = re.compile(r"^sw0?(\d{4,5})\.sph$", re.IGNORECASE)

# ---------------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------------

_MISPRONOUNCED = re.compile(r"\[([^\[\]/]*)/([^\[\]]*)\]")
_LAUGH_WORD = re.compile(r"\[(?:laughter|noise|vocalized-noise)-([^\[\]]+)\]", re.IGNORECASE)
_PARTIAL_END = re.compile(r"(\S*)\[[^\[\]\s]*\]-")  # wh[at]-  -> wh-
_PARTIAL_START = re.compile(r"-\[[^\[\]\s]*\](\S*)")  # -[th]at -> -at
_TAG = re.compile(r"\[[^\[\]]*\]")
_ANGLE = re.compile(r"<[^<>]*>")


def normalize_swbd(text: str) -> str:
    """Normalise one ms98 Switchboard transcript (rules 1-7 of the module docstring)."""
    t = _MISPRONOUNCED.sub(lambda m: m.group(2), text)
    t = _LAUGH_WORD.sub(lambda m: m.group(1), t)
    t = _PARTIAL_END.sub(lambda m: m.group(1) + "-", t)
    t = _PARTIAL_START.sub(lambda m: "-" + m.group(1), t)
    t = _TAG.sub(" ", t)
    t = t.replace("{", "").replace("}", "")
    t = _ANGLE.sub(" ", t)
    words = [re.sub(r"_\d+$", "", w) for w in t.split()]
    return " ".join(w.upper() for w in words if w and w not in ("-",))


def scoring_filter(text: str) -> str:
    """Drop hesitations, partial words, ``[...]`` tags and ``<UNK>`` (upper-cases the rest)."""
    out = []
    for w in text.upper().split():
        if w in HESITATIONS or w == "<UNK>" or w.startswith("-") or w.endswith("-"):
            continue
        if w.startswith("[") and w.endswith("]"):
            continue
        out.append(w)
    return " ".join(out)


def normalize_stm(words: str) -> str:
    """Reference words of an STM line -> training / approximate-scoring text."""
    t = re.sub(r"<[BE]_ASIDE>", " ", words, flags=re.IGNORECASE)
    t = t.replace("(", " ").replace(")", " ")
    return scoring_filter(t)


# ---------------------------------------------------------------------------------------------
# Writing data directories
# ---------------------------------------------------------------------------------------------


def _utt_id(reco: str, start: float, end: float) -> str:
    return f"{reco}_{int(round(start * 100)):06d}-{int(round(end * 100)):06d}"


def _sph_entry(path: Path, channel: int) -> str:
    return f"sph2pipe -f wav -p -c {channel} {path.absolute()} |"


def _write(path: Path, lines) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def write_segmented_dir(out_dir: Path, recos: dict[str, str], segs: list[tuple[str, str, float, float, str]]) -> None:
    """Write wav.scp / segments / text / utt2spk / spk2utt (speaker = recording), sorted.

    recos: ``reco_id -> wav.scp value``; segs: ``(utt_id, reco_id, start, end, text)``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    segs = sorted(segs)
    used = sorted({s[1] for s in segs})
    spk2utt: dict[str, list[str]] = defaultdict(list)
    for utt, reco, *_ in segs:
        spk2utt[reco].append(utt)
    _write(out_dir / "wav.scp", (f"{r} {recos[r]}" for r in used))
    _write(out_dir / "segments", (f"{u} {r} {s:.2f} {e:.2f}" for u, r, s, e, _ in segs))
    _write(out_dir / "text", (f"{u} {t}" for u, _, _, _, t in segs))
    _write(out_dir / "utt2spk", (f"{u} {r}" for u, r, *_ in segs))
    _write(out_dir / "spk2utt", (f"{s} {' '.join(spk2utt[s])}" for s in sorted(spk2utt)))


def _check_sph_readable(path: Path) -> None:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile's error types vary between versions
        raise DataError(f"cannot read {path} ({e}); shorten-compressed LDC SPHERE files must be converted "
                        "first, e.g. sph2pipe -f sph -p file.sph out.sph (see egs/swbd/asr1/README.md)") from None
    if info.channels != 2:
        raise DataError(f"{path}: expected a two-channel SPHERE file (sides A and B), found {info.channels} channel(s)")


# ---------------------------------------------------------------------------------------------
# Switchboard-1 training data
# ---------------------------------------------------------------------------------------------


def find_swbd_audio(swbd_root: Path) -> dict[str, Path]:
    """``conversation number (e.g. '2001') -> sw02001.sph`` found anywhere under the root."""
    found = {}
    for p in sorted(swbd_root.rglob("*")):
        m = _SPH_SW.match(p.name)
        if m and p.is_file():
            found[str(int(m.group(1)))] = p
    return found


def find_ms98_transcripts(trans_root: Path) -> list[Path]:
    return sorted(trans_root.rglob("sw*-ms98-a-trans.text"))


def swbd_data_dirs(swbd_root, trans_root, out_train, out_dev=None, dev_utts: int = 4000,
                   max_dup: int = 300, max_duration: float = 0.0) -> dict[str, int]:
    """Kaldi dirs for Switchboard-1 from the LDC97S62 audio and the ms98 transcripts.

    out_dev gets the first ``dev_utts`` utterances (sorted ids: the first conversations), as
    Kaldi's and ESPnet's ``train_dev``; out_train the rest, with at most ``max_dup`` copies
    of any one transcript (Kaldi's ``train_nodup``; 0 = no limit) and, if ``max_duration``,
    segments up to that many seconds. Returns counts.
    """
    swbd_root, trans_root = Path(swbd_root), Path(trans_root)
    if not swbd_root.is_dir():
        raise DataError(f"Switchboard root {swbd_root} does not exist (expected the LDC97S62 folders swb1_d*/data/*.sph)")
    if not trans_root.is_dir():
        raise DataError(f"Switchboard transcripts {trans_root} do not exist (expected swb_ms98_transcriptions/"
                        "NN/NNNN/swNNNNA-ms98-a-trans.text)")
    audio = find_swbd_audio(swbd_root)
    if not audio:
        raise DataError(f"no Switchboard audio sw0NNNN.sph under {swbd_root}")
    trans = find_ms98_transcripts(trans_root)
    if not trans:
        raise DataError(f"no ms98 transcripts (swNNNN[AB]-ms98-a-trans.text) under {trans_root}")
    _check_sph_readable(next(iter(audio.values())))

    recos, segs, missing, dropped = {}, [], set(), 0
    for tf in trans:
        with open(tf, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split(maxsplit=3)
                if not fields:
                    continue
                m = _MS98_LINE.match(fields[0]) if len(fields) >= 3 else None
                if m is None:
                    raise DataError(f"{tf}:{lineno}: malformed line {line.strip()!r}: expected "
                                    "'swNNNNA-ms98-a-NNNN <start> <end> <words>'")
                conv, side = str(int(m.group(1))), m.group(2)
                try:
                    start, end = float(fields[1]), float(fields[2])
                except ValueError:
                    raise DataError(f"{tf}:{lineno}: start and end must be numbers: {line.strip()!r}") from None
                if conv not in audio:
                    missing.add(conv)
                    continue
                text = normalize_swbd(fields[3] if len(fields) > 3 else "")
                if not text or end <= start:
                    dropped += 1
                    continue
                reco = f"sw0{conv}-{side}" if len(conv) == 4 else f"sw{conv}-{side}"
                recos[reco] = _sph_entry(audio[conv], 1 if side == "A" else 2)
                segs.append((_utt_id(reco, start, end), reco, start, end, text))
    if missing:
        raise DataError(f"{len(missing)} conversation(s) have transcripts but no audio under {swbd_root}: "
                        f"{', '.join('sw0' + c for c in sorted(missing)[:5])}")
    if not segs:
        raise DataError(f"no usable segments in {trans_root}")
    ids = [s[0] for s in segs]
    if len(set(ids)) != len(ids):
        dup = [k for k, n in Counter(ids).items() if n > 1]
        raise DataError(f"duplicate segment ids (same side, same times): {dup[:5]}")
    segs.sort()
    dev, train = (segs[:dev_utts], segs[dev_utts:]) if out_dev else ([], segs)
    if max_duration > 0:
        train = [s for s in train if s[3] - s[2] <= max_duration]
    if max_dup > 0:
        seen: Counter = Counter()
        kept = []
        for s in train:
            seen[s[4]] += 1
            if seen[s[4]] <= max_dup:
                kept.append(s)
        train = kept
    if not train:
        raise DataError(f"no training segments left after holding out {dev_utts} for dev: lower --dev_utts")
    write_segmented_dir(Path(out_train), recos, train)
    read_data_dir(out_train)  # every file we wrote must read back (audio present, ids consistent)
    counts = {"train": len(train), "dropped_empty": dropped}
    if out_dev:
        write_segmented_dir(Path(out_dev), recos, dev)
        read_data_dir(out_dev)
        counts["dev"] = len(dev)
    return counts


# ---------------------------------------------------------------------------------------------
# eval2000 / RT03 (STM references)
# ---------------------------------------------------------------------------------------------


def fix_stm_line(line: str) -> str:
    """The published eval2000 STM upsets hubscr in two ways we repair (as Kaldi does):
    ``((word))`` -> ``(word)`` and the ``<B_ASIDE>`` / ``<E_ASIDE>`` markers removed."""
    line = line.replace("((", "(").replace("))", ")")
    return re.sub(r"\s*<[BE]_ASIDE>", "", line, flags=re.IGNORECASE)


def stm_data_dir(speech_root, stm_path, out_dir, glm_path=None) -> dict[str, int]:
    """Kaldi dir of an STM-referenced test set (eval2000, RT03) plus ``stm`` (repaired) and
    ``glm`` (copied, when given) for hubscr. Returns counts."""
    speech_root, stm_path, out_dir = Path(speech_root), Path(stm_path), Path(out_dir)
    if not speech_root.is_dir():
        raise DataError(f"speech folder {speech_root} does not exist (eval2000: LDC2002S09 hub5e_00/english/*.sph)")
    if not stm_path.is_file():
        raise DataError(f"reference STM {stm_path} not found (eval2000: LDC2002T43 "
                        "reference/hub5e00.english.000405.stm)")
    audio = {p.stem: p for p in sorted(speech_root.rglob("*.sph"))}
    if not audio:
        raise DataError(f"no *.sph audio under {speech_root}")
    _check_sph_readable(next(iter(audio.values())))
    recos, segs, fixed, missing = {}, [], [], set()
    with open(stm_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if line.startswith(";;") or not line.strip():
                fixed.append(line)
                continue
            line = fix_stm_line(line)
            fixed.append(line)
            fields = line.split(maxsplit=6)
            if len(fields) < 5:
                raise DataError(f"{stm_path}:{lineno}: malformed STM line {line!r}: expected "
                                "'<file> <channel> <speaker> <start> <end> [<labels>] <words>'")
            conv, side = fields[0], fields[1].upper()
            try:
                start, end = float(fields[3]), float(fields[4])
            except ValueError:
                raise DataError(f"{stm_path}:{lineno}: start and end must be numbers: {line!r}") from None
            rest = fields[5:]
            if rest and rest[0].startswith("<"):
                rest = rest[1:]
            words = " ".join(rest)
            if "IGNORE_TIME_SEGMENT_IN_SCORING" in words:
                continue
            if conv not in audio:
                missing.add(conv)
                continue
            text = normalize_stm(words)
            if not text or end <= start:
                continue
            reco = f"{conv}-{side}"
            recos[reco] = _sph_entry(audio[conv], 1 if side == "A" else 2)
            segs.append((_utt_id(reco, start, end), reco, start, end, text))
    if missing:
        raise DataError(f"{len(missing)} conversation(s) of {stm_path} have no audio under {speech_root}: "
                        f"{', '.join(sorted(missing)[:5])}")
    if not segs:
        raise DataError(f"no scorable segments in {stm_path}")
    write_segmented_dir(out_dir, recos, segs)
    _write(out_dir / "stm", fixed)
    if glm_path:
        shutil.copyfile(glm_path, out_dir / "glm")
    read_data_dir(out_dir)
    return {"utts": len(segs), "conversations": len({s[1].rsplit('-', 1)[0] for s in segs})}


# ---------------------------------------------------------------------------------------------
# Scoring: CTM files, subsets, hubscr results, approximate WER
# ---------------------------------------------------------------------------------------------


def _read_kv(path: Path) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split(maxsplit=1)
            if fields:
                out[fields[0]] = fields[1].strip() if len(fields) > 1 else ""
    return out


def write_ctm(data_dir, hyp_text, out_ctm) -> int:
    """Hypotheses (Kaldi ``text``) -> CTM for hubscr: words lower-cased, filtered by
    ``scoring_filter``, spread evenly over their segment (CTC gives no word times; sclite
    only needs each word's midpoint inside the right reference segment). Returns words written."""
    segments = {}
    for line in open(Path(data_dir) / "segments", encoding="utf-8"):
        u, r, s, e = line.split()
        segments[u] = (r, float(s), float(e))
    hyps = _read_kv(Path(hyp_text))
    lines = []
    for utt in sorted(hyps):
        if utt not in segments:
            raise DataError(f"hypothesis {utt!r} of {hyp_text} is not a segment of {data_dir}")
        reco, start, end = segments[utt]
        conv, side = reco.rsplit("-", 1)
        words = scoring_filter(hyps[utt]).lower().split()
        dur = (end - start) / max(len(words), 1)
        for k, w in enumerate(words):
            lines.append((conv, side, start + k * dur, f"{conv} {side} {start + k * dur:.2f} {dur:.2f} {w}"))
    lines.sort(key=lambda x: (x[0], x[1], x[2]))
    _write(Path(out_ctm), (x[3] for x in lines))
    return len(lines)


def subset_prefixes(stm_path) -> list[str]:
    """Conversation-name prefixes of an STM (eval2000: ``en`` = CallHome, ``sw`` = Switchboard)."""
    prefixes = set()
    for line in open(stm_path, encoding="utf-8", errors="replace"):
        if line.strip() and not line.startswith(";;"):
            prefixes.add(line.split()[0].split("_")[0])
    return sorted(prefixes)


SUBSET_NAMES = {"sw": "swbd", "en": "callhome", "fsh": "fisher"}


def split_by_prefix(path, prefix, out) -> None:
    """Keep ``;;`` header lines and the lines of conversations named ``<prefix>_*``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        keep = [line.rstrip("\n") for line in f if line.startswith(";;") or line.startswith(prefix + "_")]
    _write(Path(out), keep)


def parse_sys(path) -> dict:
    """The ``Sum/Avg`` row of an sclite ``.sys`` report (hubscr output) as numbers."""
    for line in open(path, encoding="utf-8", errors="replace"):
        if "Sum/Avg" in line:
            nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", line)]
            keys = ["sentences", "words", "corr", "sub", "del", "ins", "wer", "ser"]
            return dict(zip(keys, nums[:8]))
    raise DataError(f"no Sum/Avg line in {path}")


def approx_scores(data_dir, hyp_text) -> dict[str, dict]:
    """Our own WER per subset on ``scoring_filter``-ed text (no GLM): an approximation."""
    from allinone.eval.wer import score

    refs = {u: scoring_filter(t) for u, t in _read_kv(Path(data_dir) / "text").items()}
    hyps = {u: scoring_filter(t) for u, t in _read_kv(Path(hyp_text)).items()}
    groups = defaultdict(list)
    for u in refs:
        groups["all"].append(u)
        groups[SUBSET_NAMES.get(u.split("_")[0], u.split("_")[0])].append(u)
    out = {}
    for name, ids in sorted(groups.items()):
        r = {u: refs[u] for u in ids if refs[u]}
        if not r:
            continue
        res = score(r, {u: hyps.get(u, "") for u in r})
        out[name] = {"wer": round(res.wer, 2), "sub": res.substitutions, "del": res.deletions,
                     "ins": res.insertions, "words": res.ref_words, "sentences": len(r)}
    return out


# ---------------------------------------------------------------------------------------------
# Command line (used by egs/swbd/asr1/local/*.sh)
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m allinone.data.swbd", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("train", help="Switchboard-1 -> train / dev data dirs")
    a.add_argument("--swbd", required=True)
    a.add_argument("--transcripts", required=True)
    a.add_argument("--train", required=True)
    a.add_argument("--dev", default=None)
    a.add_argument("--dev-utts", type=int, default=4000)
    a.add_argument("--max-dup", type=int, default=300)
    a.add_argument("--max-duration", type=float, default=0.0)
    b = sub.add_parser("stm", help="eval2000 / RT03 -> data dir with stm (+ glm)")
    b.add_argument("--speech", required=True)
    b.add_argument("--stm", required=True)
    b.add_argument("--glm", default=None)
    b.add_argument("--out", required=True)
    c = sub.add_parser("ctm", help="hypothesis text -> CTM")
    c.add_argument("--data", required=True)
    c.add_argument("--hyp", required=True)
    c.add_argument("--out", required=True)
    d = sub.add_parser("prefixes", help="print the conversation prefixes of an STM")
    d.add_argument("stm")
    e = sub.add_parser("split", help="keep the lines of one conversation prefix")
    e.add_argument("--prefix", required=True)
    e.add_argument("input")
    e.add_argument("output")
    f = sub.add_parser("sys", help="print the Sum/Avg row of an sclite .sys file as JSON")
    f.add_argument("sys")
    g = sub.add_parser("approx", help="our own per-subset WER (no GLM) as JSON")
    g.add_argument("--data", required=True)
    g.add_argument("--hyp", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.cmd == "train":
            counts = swbd_data_dirs(args.swbd, args.transcripts, args.train, args.dev, args.dev_utts,
                                    args.max_dup, args.max_duration)
            print(f"Switchboard: {counts} -> {args.train}" + (f", {args.dev}" if args.dev else ""))
        elif args.cmd == "stm":
            counts = stm_data_dir(args.speech, args.stm, args.out, args.glm)
            print(f"{args.stm}: {counts} -> {args.out}")
        elif args.cmd == "ctm":
            print(f"{write_ctm(args.data, args.hyp, args.out)} words -> {args.out}")
        elif args.cmd == "prefixes":
            print(" ".join(subset_prefixes(args.stm)))
        elif args.cmd == "split":
            split_by_prefix(args.input, args.prefix, args.output)
        elif args.cmd == "sys":
            print(json.dumps(parse_sys(args.sys)))
        elif args.cmd == "approx":
            print(json.dumps(approx_scores(args.data, args.hyp), indent=1))
    except (ValueError, OSError) as e:
        print(f"{p.prog} {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
