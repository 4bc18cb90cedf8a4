"""`python -m llmpy ...` is the `llmpy` command."""
import sys

from llmpy.cli import main

sys.exit(main())
