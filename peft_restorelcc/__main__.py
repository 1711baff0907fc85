import sys

from peft_restorelcc.cli import main

sys.exit(main())
