import sys

from gpt2_decl.cli import main

sys.exit(main())
