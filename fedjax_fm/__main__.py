import sys

from fedjax_fm.cli import main

sys.exit(main())
