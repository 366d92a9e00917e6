import os
import sys

# Tests import the project's flat modules (model, moe, fp8, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
