import sys

from device_sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
