"""Custom components of the FairDRO bundle, reached from the configs as ``scripts.<module>.<Name>``.

Modules are imported lazily by the configs; heavy optional dependencies (highdicom, matplotlib,
pynetdicom) are imported only inside the modules that use them, so the inference path runs in
lean environments such as MONAI Label's.
"""

from pathlib import Path

#: absolute path of this bundle (the folder holding ``configs/`` and ``scripts/``); the configs'
#: ``bundle_root`` refers to it so that commands work from the repository root and from ``bundle/``.
BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])
