"""python -m utils.evaluate: the standalone evaluator (utils/evaluate/offline.py)."""
import sys

from utils.evaluate.offline import main

sys.exit(main())
