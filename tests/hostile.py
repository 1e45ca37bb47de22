"""Files that run code when fully unpickled, for the safe-loading tests.

Unpickling a :class:`Touch` calls ``pathlib.Path(marker).touch()``: a harmless
stand-in for ``os.system``.  The tests check that the marker file does *not*
exist after pyroflows refused the file (and that it *does* under a full
``torch.load(weights_only=False)``, so the payload is live).
"""

import pathlib
import pickle

import torch


class Touch:
    """An object whose unpickling creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def write_hostile(path, marker, kind: str = "model"):
    """A file that looks like a pyroflows ``kind`` ("model", "checkpoint") with the payload
    inside a torch.save archive, or ``kind="raw"``: a bare pickle of the payload."""
    if kind == "raw":
        with open(path, "wb") as f:
            pickle.dump({"format": "pyroflows-model", "state_dict": Touch(marker)}, f)
        return path
    tag = {"model": "pyroflows-model", "checkpoint": "pyroflows-checkpoint"}[kind]
    torch.save({"format": tag, "format_version": 1, "flow": Touch(marker), "state_dict": Touch(marker)}, path)
    return path
