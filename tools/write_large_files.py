"""Write the bundle's ``large_files.yml``: one entry per shipped weight file, with its SHA-256.

The format is the one ``python -m monai.bundle download_large_files --bundle_path BUNDLE`` reads (``path``
relative to the bundle, ``url``, ``hash_val``, ``hash_type``). ``url`` is where a published GitHub release puts
the file: ``<url-base>/<file name>``, by default
``https://github.com/OWNER/REPO/releases/download/v<metadata version>/``. Until a release with those assets is
published the URLs are a pattern, not a working download; the hashes are always those of the files on disk, so
``tools/verify_bundle.py`` and ``inference.json``'s ``large_files_yml`` check the committed files against them.

A release tool of the repository (run by ``make demo-weights``), not part of the shipped bundle. Command line::

    python tools/write_large_files.py --bundle-dir bundle [--url-base URL] [--files models/model.pt ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_FILES = ("models/model.pt", "models/model.ts")
DEFAULT_URL_BASE = "https://github.com/OWNER/REPO/releases/download/v{version}"

HEADER = """\
# Weight files of this bundle, for `python -m monai.bundle download_large_files --bundle_path <bundle>`.
# Written by `make demo-weights` in the bundle's source repository; hash_val is the sha256 of the committed
# file. url is where a published GitHub release of this bundle puts the file (release tag v<version>, asset
# named as the file); it is the download location once such a release is published, a pattern until then.
"""


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_large_files(bundle_dir: str | Path, url_base: str | None = None, files=DEFAULT_FILES) -> Path:
    """Write ``<bundle_dir>/large_files.yml`` for ``files`` (paths relative to the bundle) and return its path."""
    bundle_dir = Path(bundle_dir)
    version = json.loads((bundle_dir / "configs" / "metadata.json").read_text())["version"]
    base = (url_base or DEFAULT_URL_BASE).format(version=version).rstrip("/")
    lines = [HEADER.rstrip("\n"), "large_files:"]
    for rel in files:
        path = bundle_dir / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; train and export the weights first (make demo-weights).")
        lines += [
            f'  - path: "{rel}"',
            f'    url: "{base}/{Path(rel).name}"',
            f'    hash_val: "{sha256_file(path)}"',
            '    hash_type: "sha256"',
        ]
    out = bundle_dir / "large_files.yml"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle-dir", default=str(REPO / "bundle"))
    parser.add_argument("--url-base", default=None, help=f"release download folder (default {DEFAULT_URL_BASE})")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES))
    args = parser.parse_args(argv)
    out = write_large_files(args.bundle_dir, args.url_base, args.files)
    print(out.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
