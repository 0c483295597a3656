"""Regenerate service/colormaps.py from matplotlib (a dev-only dependency): `python scripts/gen_colormaps.py`."""

import textwrap
from pathlib import Path

import matplotlib
import numpy as np

NAMES = ("viridis", "magma", "inferno", "plasma", "coolwarm")
OUT = Path(__file__).resolve().parent.parent / "service" / "colormaps.py"


def main() -> None:
    lines = [
        '"""Colormap lookup tables (256 x RGB, uint8), generated from matplotlib by scripts/gen_colormaps.py.',
        "",
        "`LUTS[name][level]` is matplotlib's `cmap(level, bytes=True)` (an index into its 256 colours);",
        "gray is the identity.",
        '"""',
        "",
        "import numpy as np",
        "",
        "_HEX = {",
    ]
    for name in NAMES:
        lut = matplotlib.colormaps[name](np.arange(256), bytes=True)[:, :3].astype(np.uint8)
        chunks = textwrap.wrap(lut.tobytes().hex(), 96)
        lines.append(f'    "{name}": (')
        lines.extend(f'        "{c}"' for c in chunks)
        lines.append("    ),")
    lines += [
        "}",
        "",
        "GRAY = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)",
        "LUTS: dict[str, np.ndarray] = {",
        '    "gray": GRAY,',
        "    **{name: np.frombuffer(bytes.fromhex(h), dtype=np.uint8).reshape(256, 3) for name, h in _HEX.items()},",
        "}",
        "COLORMAPS: tuple[str, ...] = tuple(LUTS)",
        "",
    ]
    OUT.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
