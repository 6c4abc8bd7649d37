import sys

from codecllm.cli import main

sys.exit(main())
