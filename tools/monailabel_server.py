"""Start MONAI Label (``python -m monailabel.main ...``) in a CPU-only environment.

PyPI's torchvision wheel is a CUDA build; beside the CPU torch its import fails with
``operator torchvision::nms does not exist``, and MONAI Label's sample apps import
``monailabel.transform.post`` (which imports torchvision) at start-up. A segmentation bundle never
calls these detection operators, so their schemas are registered (no kernels) before anything
imports torchvision. Run with the MONAI Label venv's python; the arguments are those of the
``monailabel`` command, e.g. ``start_server --app apps/monaibundle --studies DIR --conf models NAME``.
"""

import sys

import torch

_TORCHVISION_STUBS = None


def register_torchvision_stubs() -> None:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` if the installed torchvision lacks them."""
    global _TORCHVISION_STUBS
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probe only
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_STUBS = lib  # keep the library object alive, else the definitions are dropped


if __name__ == "__main__":
    register_torchvision_stubs()
    from monailabel.main import Main

    sys.argv[0] = "monailabel"
    Main().run()
