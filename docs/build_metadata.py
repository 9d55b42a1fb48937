"""Write datasette-metadata.json, the metadata the package builds (addon/datasette/metadata.py):

    .venv/bin/python docs/build_metadata.py > datasette-metadata.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addon.datasette.metadata import write  # noqa: E402

if __name__ == "__main__":
    write(sys.stdout)
