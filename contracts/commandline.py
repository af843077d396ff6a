"""The argument parser of the three commands (`seedance-worker`, `seedance`, `seedance-mock`): a bad
argument gets one line and exit status 2, without argparse's usage dump."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
