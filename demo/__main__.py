"""``python -m demo``: see ``demo.run``."""
from .run import main

if __name__ == "__main__":
    main()
