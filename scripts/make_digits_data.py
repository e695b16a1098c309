"""Writes ``src/gradguard/tools/tasks/data/digits.npz`` from scikit-learn's bundled digits.

Run once (the output is committed), so that ``gradguard demo`` needs no
scikit-learn:

    python scripts/make_digits_data.py

The file holds ``images`` (1797, 8, 8) uint8 in 0..16 and ``target`` (1797,)
uint8, exactly ``sklearn.datasets.load_digits()``'s values (they are small
integers stored as floats there, so uint8 loses nothing).
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "src" / "gradguard" / "tools" / "tasks" / "data" / "digits.npz"


def main() -> None:
    d = load_digits()
    images = d.images.astype(np.uint8)
    target = d.target.astype(np.uint8)
    # Refuse to write anything that does not round-trip exactly.
    if not (np.array_equal(images, d.images) and np.array_equal(target, d.target)):
        raise SystemExit("load_digits() values are not small integers; uint8 would change them")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, images=images, target=target)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
