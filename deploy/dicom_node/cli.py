"""``python -m dicom_node --config deploy/dicom_node.json [site.json ...] [--key value ...]`` (``deploy/`` and the
bundle on ``PYTHONPATH``; ``make dicom-node`` sets it)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .settings import DicomNodeError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "dicom_node.json"


def _parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs; values are read as JSON when they parse, else as strings."""
    overrides: dict[str, Any] = {}
    items = list(args)
    while items:
        token = items.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise DicomNodeError(f"expected --key value, got {token!r}.")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if not items:
                raise DicomNodeError(f"--{key} needs a value.")
            value = items.pop(0)
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def _flag(value: str) -> bool:
    """``--cold`` / ``--cold true`` / ``--cold false``."""
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return text == "true"


def _arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The named options, and the other ``--key value`` tokens (config overrides)."""
    epilog = "Other --key value pairs override config settings (JSON values), e.g. --port 11113."
    ap = argparse.ArgumentParser(prog="python -m dicom_node", description=__doc__.split("\n\n")[0], epilog=epilog)
    ap.add_argument("--config", nargs="+", default=[str(DEFAULT_CONFIG)], help="config file(s), merged in order")
    ap.add_argument("--log_level", default="INFO", help="logging level (default INFO)")
    cold_help = "build the inference workflow for every series (the config's cold setting; default: warm)"
    ap.add_argument("--cold", nargs="?", const=True, default=None, type=_flag, help=cold_help)
    return ap.parse_known_args(argv)


def read_settings(argv: Sequence[str] | None = None) -> Any:
    """The node's settings as a MONAI ``ConfigParser``: config file(s), then ``--key value`` overrides, then
    ``--cold``. Logging is left alone."""
    from monai.bundle import ConfigParser

    args, rest = _arguments(argv)
    parser = ConfigParser()
    parser.read_config(args.config)
    parser.update(_parse_overrides(rest))
    if args.cold is not None:
        parser.update({"cold": args.cold})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build the node from the config file(s) and overrides, then serve until SIGINT/SIGTERM."""
    args, _ = _arguments(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        node = read_settings(argv).get_parsed_content("node")
    except Exception as err:  # MONAI wraps errors raised while instantiating the node in a RuntimeError
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, DicomNodeError):
            cause = cause.__cause__
        print(f"error: {cause}", file=sys.stderr)
        return 2
    node.serve_forever()
    return 0
