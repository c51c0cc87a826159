"""The engine's own small rule pack (tests/data/rules) and its keys."""

import os
from functools import cache
from pathlib import Path

from extproc.detect.engine import Detector
from extproc.detect.rules import load_rules
from extproc.mask import Inspector

DATA = Path(__file__).resolve().parent / "data"
RULES = DATA / "rules"
EDM_KEY_FILE = DATA / "edm.key"
PLAIN_POLICIES = DATA / "policies-plain"  # the shipped base and default, without group policies
EDM_KEY = EDM_KEY_FILE.read_bytes()
HASH_KEY = b"test-hash-key-0123456789"


def hyperscan_cache() -> Path | None:
    """The session's folder of compiled databases (conftest sets it): the shipped pack, 200-odd rules and
    seconds to compile, is compiled once per run, not once per module that scans with it."""
    folder = os.environ.get("EXTPROC_DETECT__CACHE_DIR")
    return Path(folder) if folder else None


@cache
def inspector() -> Inspector:
    return Inspector.build(load_rules([RULES]), hash_key=HASH_KEY, edm_key=EDM_KEY)


def detector() -> Detector:
    return inspector().detector
