"""Small generated data sets for tests that train for real (no downloads)."""
import numpy as np


def quadrant_images(n, seed):
    """uint8 (n, 28, 28) images whose label (0-3) is the quadrant holding a bright square."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        top, left = divmod(int(label), 2)
        y, x = 2 + 14 * top + rng.integers(0, 5), 2 + 14 * left + rng.integers(0, 5)
        image[y:y + 7, x:x + 7] = 250
    return images, labels
