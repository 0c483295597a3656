"""Write openapi/openapi.json from the app: `python -m scripts.export_openapi` (or `make openapi`)."""

import json
from pathlib import Path

from service.config import Settings
from service.main import create_app

OUT = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def render() -> str:
    return json.dumps(create_app(Settings()).openapi(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
