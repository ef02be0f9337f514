"""`mmbridge` as torchrun starts it (tests/test_train.py): print this process's rank, then run the CLI."""
import os
import sys

from mmbridge_ref.cli import main

if __name__ == "__main__":
    print(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}", flush=True)
    sys.exit(main(sys.argv[1:]))
