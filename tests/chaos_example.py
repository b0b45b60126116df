"""The example, with every checkpoint write slowed down so random kills land inside writes too.

python tests/chaos_example.py [example arguments]
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

from enginekit import files

# between fsync and rename of a checkpoint's state.pt and manifest.json (its commit): the riskiest moment
files.before_replace = lambda tmp: time.sleep(0.15)
sys.argv = [str(Path(__file__).parents[1] / "examples" / "pretrain_verdict.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
