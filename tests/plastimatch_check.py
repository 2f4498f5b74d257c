"""Independent rasterisation of an RTSTRUCT ROI with plastimatch, sampled on the bundle's CT grid (test helper)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import needs_tool
from scipy.ndimage import map_coordinates

needs_plastimatch = needs_tool("plastimatch")


def plastimatch_mask(rtstruct: Path, info, out: Path, roi: str = "CTV", *extra: str) -> tuple[np.ndarray, int]:
    """Rasterise ``roi`` of ``rtstruct`` with ``plastimatch convert`` on the CT of ``info`` (a ``SeriesInfo``).

    Returns:
        ``(mask, n)``: plastimatch's mask sampled at our voxel centres through both RAS affines (whatever its axis
        order), shape ``info.shape``; and the number of voxels of plastimatch's own mask (to see nothing was cut off).
    """
    cmd = ["plastimatch", "convert", "--input", str(rtstruct), "--referenced-ct", str(info.series_dir),
           "--output-prefix", str(out), "--prefix-format", "nii.gz", *extra]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    image = nib.load(out / f"{roi}.nii.gz")
    theirs = np.asarray(image.dataobj) > 0
    index = np.indices(info.shape).reshape(3, -1)
    world = info.affine_ras @ np.vstack([index, np.ones(index.shape[1])])
    at = (np.linalg.inv(image.affine) @ world)[:3]
    sampled = map_coordinates(theirs.astype(np.float32), at, order=0, cval=0.0).reshape(info.shape) > 0
    return sampled, int(np.count_nonzero(theirs))
