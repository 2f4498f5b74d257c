"""``python -m dicom_node``: see :mod:`dicom_node.cli`."""

import sys

from .cli import main

sys.exit(main())
