"""Write eeg_de_features.npy: 8 seeded synthetic EEG feature maps (8, 5, 9, 9) for models/eegnet.toml.

Each map holds one value per frequency band (delta, theta, alpha, beta, gamma) for the 62 electrodes of
a 10-20 cap laid on a 9x9 scalp grid (cells outside the cap are 0), as differential-entropy features are
arranged for grid CNNs. Values: a smooth per-band field over the scalp (a few Gaussian bumps) plus noise,
per-band offsets, then standardised per band over the electrodes. Synthetic, not recorded EEG.

Run from the repository root: .venv/bin/python models/data/make_eeg_features.py
"""

from pathlib import Path

import numpy as np

SAMPLES, BANDS, GRID = 8, 5, 9
# Electrodes per row of the 9x9 grid (62 in all), centred in the row: a round cap, 10-20 layout.
ROW_COUNTS = (3, 5, 9, 9, 9, 9, 9, 7, 2)


def cap_mask() -> np.ndarray:
    mask = np.zeros((GRID, GRID), bool)
    for row, n in enumerate(ROW_COUNTS):
        start = (GRID - n) // 2
        mask[row, start : start + n] = True
    return mask


def main() -> None:
    rng = np.random.default_rng(0)
    mask = cap_mask()
    yy, xx = np.mgrid[0:GRID, 0:GRID]
    out = np.zeros((SAMPLES, BANDS, GRID, GRID), np.float32)
    for s in range(SAMPLES):
        for b in range(BANDS):
            field = np.full((GRID, GRID), rng.normal(1.0 - 0.15 * b, 0.2))
            for _ in range(3):
                cy, cx = rng.uniform(0, GRID - 1, 2)
                width = rng.uniform(1.5, 3.5)
                field += rng.normal(0, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
            field += rng.normal(0, 0.1, field.shape)
            values = field[mask]
            out[s, b][mask] = (values - values.mean()) / values.std()
    path = Path(__file__).with_name("eeg_de_features.npy")
    np.save(path, out)
    print(f"wrote {path} {out.shape} ({mask.sum()} electrodes)")


if __name__ == "__main__":
    main()
