"""Build the release asset that ``python -m monai.bundle download --source github`` fetches.

MONAI's GitHub source downloads ``https://github.com/<owner>/<repo>/releases/download/<tag>/<name>_v<version>.zip``
and extracts it with one top folder named ``<name>``. This script writes that zip from ``bundle/`` (tracked
bundle files only: configs, scripts, models, docs, LICENSE, large_files.yml; no caches, runs or data)::

    python tools/release_zip.py --out build/   # -> build/fairdro_ctv_segmentation_v<version>.zip

Publish it as an asset of the GitHub release ``v<version>`` (with ``models/model.pt`` and ``models/model.ts``,
the ``url`` entries of ``large_files.yml``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE_NAME = "fairdro_ctv_segmentation"
INCLUDE = ("LICENSE", "large_files.yml", "configs", "scripts", "models", "docs")


def bundle_files(bundle: Path) -> list[Path]:
    """The files git tracks under the bundle's INCLUDE entries (a local model, cache or run never ships)."""
    files = []
    for entry in INCLUDE:
        if not (bundle / entry).exists():
            raise FileNotFoundError(f"{bundle / entry} is missing; the release zip needs it.")
        listed = subprocess.run(["git", "ls-files", "-z", "--", entry], cwd=bundle, capture_output=True, check=True)
        tracked = sorted(bundle / name for name in listed.stdout.decode().split("\0") if name)
        if not tracked:
            raise FileNotFoundError(f"git tracks nothing under {bundle / entry}; commit it before building a release.")
        files += tracked
    return files


def build_zip(bundle: Path, out_dir: Path) -> Path:
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{BUNDLE_NAME}_v{version}.zip"
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or choose another --out.")
    tmp = target.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in bundle_files(bundle):
            zf.write(path, f"{BUNDLE_NAME}/{path.relative_to(bundle).as_posix()}")
    tmp.replace(target)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "bundle")
    ap.add_argument("--out", type=Path, default=REPO / "build")
    args = ap.parse_args()
    print(build_zip(args.bundle, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
