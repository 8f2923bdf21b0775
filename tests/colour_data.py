"""Small generated colour data for tests: a colour-and-shape task, CIFAR-10 batch files, image folders."""
from pathlib import Path

import numpy as np

from gpucnn.data import cifar

# class = (colour, shape): red square, red cross, blue square, blue cross
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}
SHAPES = ("square", "cross")
CLASSES = tuple(f"{colour}-{shape}" for colour in COLOURS for shape in SHAPES)


def colour_shape_images(n, seed, size=32):
    """uint8 (n, 3, size, size) images and int64 labels (0-3): a red or blue square or cross on grey noise.

    Neither the colour nor the shape alone gives the label.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n)
    images = rng.integers(90, 150, (n, 3, size, size)).astype(np.uint8)
    side = size // 2
    for image, label in zip(images, labels):
        colour = np.array(list(COLOURS.values())[label // 2], np.uint8)[:, None, None]
        y, x = rng.integers(0, size - side + 1, 2)
        if SHAPES[label % 2] == "square":
            image[:, y:y + side, x:x + side] = colour
        else:
            bar = side // 4
            mid = side // 2 - bar // 2
            image[:, y + mid:y + mid + bar, x:x + side] = colour
            image[:, y:y + side, x + mid:x + mid + bar] = colour
    return images, labels.astype(np.int64)


def write_cifar_dir(folder, train_per_batch=8, test=10, seed=0, meta=True):
    """The official layout in ``folder``: data_batch_1..5.bin, test_batch.bin, batches.meta.txt (small)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate((*cifar.SPLIT_FILES["train"], *cifar.SPLIT_FILES["test"])):
        n = test if name == "test_batch.bin" else train_per_batch
        rng = np.random.default_rng([seed, i])
        images = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
        labels = rng.integers(0, 10, n)
        cifar.write_batch(folder / name, images, labels)
        written[name] = (images, labels)
    if meta:
        (folder / cifar.META_FILE).write_text("\n".join(cifar.CLASSES) + "\n\n")
    return written


def write_image_folder(root, per_class_train=6, per_class_test=3, size=24, seed=0, formats=("png", "jpg")):
    """root/{train,test}/<class>/<i>.<fmt> from colour_shape_images (PNG and JPEG alternating)."""
    from PIL import Image
    root = Path(root)
    written = []
    for split, per_class, split_seed in (("train", per_class_train, seed), ("test", per_class_test, seed + 1)):
        images, labels = colour_shape_images(per_class * len(CLASSES) * 3, split_seed, size=size)
        counts = dict.fromkeys(range(len(CLASSES)), 0)
        for image, label in zip(images, labels):
            label = int(label)
            if counts[label] >= per_class:
                continue
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            fmt = formats[counts[label] % len(formats)]
            path = folder / f"{counts[label]:03d}.{fmt}"
            Image.fromarray(image.transpose(1, 2, 0)).save(path)
            written.append(path)
            counts[label] += 1
    return written
