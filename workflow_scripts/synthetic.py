"""Synthetic scenes: the embedded default data set.

Small images hold 2-6 objects from a vocabulary of shape x colour classes on the
background of a scene type. Each scene type prefers a fixed subset of classes,
so objects co-occur the way kitchens hold stoves and microwaves: that is the
dataset-level correlation a reference model can exploit without memorising.
Captions name the scene and only one or two of the objects, with varied
wording and incidental details (adjectives, a time, a viewpoint), so most of an
image's objects are not in its caption.

The "world" (which scene prefers which classes, scene backgrounds) depends only
on `world_seed`, shared by every synthetic dataset, so the training pool and the
public set follow one distribution; the samples themselves depend on the
dataset's own seed.

Besides the records and ground truth, `boxes.parquet` holds each image's dominant object's box (the SSL
test's foreground box) and `objects.parquet` every drawn object's box (the crop tags of the SSL test's naive Bayes
reference): the generator knows where it draws them. An object's box is that of all its drawn pixels, also those
the foreground object later paints over.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw
from tqdm import tqdm

from workflow_scripts.cli import add_dataclass_arguments, dataclass_from_args
from workflow_scripts.contracts import BOXES, GROUND_TRUTH, OBJECTS, RECORDS
from workflow_scripts.images import content_hash
from workflow_scripts.io import atomic_path, write_parquet

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
COLOURS = {
    "red": (225, 35, 35),
    "green": (35, 190, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 215),
    "orange": (250, 140, 25),
}
SCENES = ("kitchen", "garden", "office", "beach", "street", "bedroom", "forest", "harbour")
ADJECTIVES = (
    "cozy",
    "bright",
    "dim",
    "busy",
    "quiet",
    "old",
    "modern",
    "small",
    "large",
    "messy",
    "tidy",
    "sunny",
    "rainy",
    "colourful",
    "plain",
    "crowded",
)
DETAILS = (
    "at noon",
    "in winter",
    "at dusk",
    "seen from above",
    "in the morning",
    "on a weekend",
    "after the rain",
    "late at night",
    "in summer",
    "from a distance",
    "up close",
    "on a cloudy day",
    "during a party",
    "before dinner",
    "in spring",
    "under warm light",
)
TEMPLATES = (
    "a {adj} {scene} with {objects}",
    "a photo of {objects} in a {adj} {scene} {detail}",
    "there is {objects} in this {adj} {scene}",
    "{detail}, a {adj} {scene} and {objects}",
    "inside a {adj} {scene}: {objects}",
    "snapshot of a {scene} {detail}, featuring {objects}",
    "{objects} sit in the {scene} {detail}",
    "the {adj} {scene} has {objects}",
)


def class_names() -> list[str]:
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class SyntheticConfig:
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 6
    preferred_per_scene: int = 10
    preferred_probability: float = 0.8
    min_mentioned: int = 1
    max_mentioned: int = 2
    world_seed: int = 0


@dataclass(frozen=True)
class SceneStyle:
    """Per-data-set drawing options (the SSL test's): `background_marks` thin random strokes behind the objects,
    a background unique to each image as a photograph's is; `foreground_radius` (in grid cells; None: off) draws
    `objects[0]` large, at a random place, over the others: the image's foreground object, its label."""

    background_marks: int = 0
    foreground_radius: float | None = None


class SceneWorld:
    """Scene types, their preferred classes and backgrounds, fixed by `world_seed`."""

    def __init__(self, config: SyntheticConfig):
        self.config = config
        self.classes = class_names()
        rng = np.random.default_rng(config.world_seed)
        n_classes = len(self.classes)
        self.preferred = np.stack(
            [rng.choice(n_classes, size=config.preferred_per_scene, replace=False) for _ in SCENES]
        )
        # Dark, distinct backgrounds so every object colour stays visible.
        hues = np.linspace(0, 1, len(SCENES), endpoint=False)
        self.backgrounds = [_dark_colour(h) for h in hues]
        self.patterns = [i % 4 for i in range(len(SCENES))]

    def sample_objects(self, scene: int, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        weights = np.full(len(self.classes), (1 - cfg.preferred_probability) / len(self.classes))
        weights[self.preferred[scene]] += cfg.preferred_probability / cfg.preferred_per_scene
        return rng.choice(len(self.classes), size=n, replace=False, p=weights / weights.sum())

    def render(
        self, scene: int, objects: np.ndarray, rng: np.random.Generator, style: SceneStyle | None = None
    ) -> tuple[Image.Image, int, tuple[int, int, int, int]]:
        """Draw the scene in `style`; return the image, the class of its dominant object (the largest, or with
        `style.foreground_radius` the foreground object, `objects[0]`) and that object's box (x_min, y_min,
        x_max, y_max in pixels, max exclusive)."""
        image, dominant, box, _ = self.render_objects(scene, objects, rng, style)
        return image, dominant, box

    def render_objects(
        self, scene: int, objects: np.ndarray, rng: np.random.Generator, style: SceneStyle | None = None
    ) -> tuple[Image.Image, int, tuple[int, int, int, int], list[tuple[int, tuple[int, int, int, int]]]]:
        """`render`'s image, dominant class and box, and (class, drawn box) of every object, in `objects` order.

        The same random draws as `render`: the boxes come from masks (`drawn_box`), not from the generator."""
        style = style or SceneStyle()
        size = self.config.image_size
        image = Image.new("RGB", (size, size), self.backgrounds[scene])
        draw = ImageDraw.Draw(image)
        _draw_pattern(draw, self.patterns[scene], size, self.backgrounds[scene])
        _draw_marks(draw, style.background_marks, size, rng)
        foreground = style.foreground_radius is not None
        dominant, dominant_shape, shapes = self._draw_grid_objects(draw, objects[int(foreground) :], rng)
        if foreground:
            dominant = int(objects[0])
            shape = self.classes[dominant].split(" ")[1]
            radius = size / 3 * style.foreground_radius
            cx, cy = rng.uniform(radius, size - radius, 2)
            _draw_shape(draw, shape, cx, cy, radius, COLOURS[self.classes[dominant].split(" ")[0]])
            dominant_shape = (shape, cx, cy, radius)
            shapes.insert(0, dominant_shape)
        boxes = [(int(class_index), drawn_box(size, *drawn)) for class_index, drawn in zip(objects, shapes)]
        return image, dominant, drawn_box(size, *dominant_shape), boxes

    def _draw_grid_objects(self, draw: ImageDraw.ImageDraw, objects: np.ndarray, rng: np.random.Generator):
        """Draw each object in its own cell of a 3x3 grid (none hides another); return the largest's class and
        (shape, cx, cy, radius), and every object's (shape, cx, cy, radius) in `objects` order."""
        cells = rng.choice(9, size=len(objects), replace=False)
        cell = self.config.image_size / 3
        dominant, dominant_shape = int(objects[0]) if len(objects) else -1, ("", 0.0, 0.0, 0.0)
        shapes = []
        for class_index, cell_index in zip(objects, cells):
            colour_name, shape = self.classes[class_index].split(" ")
            radius = cell * rng.uniform(0.3, 0.45)
            cx = (cell_index % 3 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
            cy = (cell_index // 3 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
            _draw_shape(draw, shape, cx, cy, radius, COLOURS[colour_name])
            shapes.append((shape, cx, cy, radius))
            if radius > dominant_shape[3]:
                dominant, dominant_shape = int(class_index), (shape, cx, cy, radius)
        return dominant, dominant_shape, shapes

    def caption(self, scene: int, objects: np.ndarray, rng: np.random.Generator) -> str:
        cfg = self.config
        n_mentioned = int(rng.integers(cfg.min_mentioned, min(cfg.max_mentioned, len(objects)) + 1))
        mentioned = [_with_article(self.classes[i]) for i in rng.choice(objects, size=n_mentioned, replace=False)]
        return TEMPLATES[rng.integers(len(TEMPLATES))].format(
            adj=ADJECTIVES[rng.integers(len(ADJECTIVES))],
            scene=SCENES[scene],
            detail=DETAILS[rng.integers(len(DETAILS))],
            objects=" and ".join(mentioned),
        )


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _dark_colour(hue: float) -> tuple[int, int, int]:
    phase = 2 * math.pi * hue
    return tuple(int(45 + 30 * math.cos(phase + offset)) for offset in (0, 2.1, 4.2))


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: int, size: int, base: tuple[int, int, int]) -> None:
    light = tuple(min(255, c + 25) for c in base)
    step = max(4, size // 8)
    if pattern == 1:  # horizontal stripes
        for y in range(0, size, step):
            draw.line([(0, y), (size, y)], fill=light)
    elif pattern == 2:  # vertical stripes
        for x in range(0, size, step):
            draw.line([(x, 0), (x, size)], fill=light)
    elif pattern == 3:  # dots
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.point((x, y), fill=light)


def _draw_marks(draw: ImageDraw.ImageDraw, marks: int, size: int, rng: np.random.Generator) -> None:
    """Thin random-coloured strokes: a background unique to the image, as a photograph's is (the SSL test's
    memorization needs a background only its own image has; a scene's flat colour is shared by thousands)."""
    for _ in range(marks):
        start = rng.uniform(0, size, 2)
        end = start + rng.uniform(-size / 4, size / 4, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([tuple(start), tuple(end)], fill=colour, width=int(rng.integers(1, 3)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 2.5)))
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        draw.polygon(points, fill=colour)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r / 3.5, cx + r, cy + r / 3.5], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def drawn_box(size: int, shape: str, cx: float, cy: float, r: float) -> tuple[int, int, int, int]:
    """The pixel box (max exclusive) of the shape as `_draw_shape` draws it, from a mask drawn the same way.

    Drawing it again beats computing it from the geometry: PIL's rounding, outline widths and polygon fill
    rules decide which pixels are set, and a mask sees exactly those.
    """
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255)
    box = mask.getbbox()
    return box if box is not None else (0, 0, 0, 0)  # a shape too small to set a pixel: an empty box


def generate(
    dataset: str,
    n_records: int,
    seed: int,
    config: SyntheticConfig,
    out_dir: str | Path,
    style: SceneStyle | None = None,
) -> None:
    """Write `records.parquet`, `ground_truth.parquet`, `boxes.parquet`, `objects.parquet` and `images/` under
    out_dir, each image drawn in `style` (default: the VLM test's scenes)."""
    style = style or SceneStyle()
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "images") as image_dir:
        image_dir.mkdir(parents=True)
        world = SceneWorld(config)
        drawn = draw_records(dataset, n_records, np.random.default_rng(seed), world, style, image_dir)
    params = {"dataset": dataset, "n_records": n_records, "seed": seed, **config.__dict__}
    params |= {key: value for key, value in style.__dict__.items() if value != SceneStyle.__dict__[key]}
    record_columns = ["id", "image_path", "captions", "image_sha256", "scene", "dominant_object"]
    records = pl.DataFrame(
        {name: drawn[name] for name in record_columns}, schema=RECORDS.polars([*RECORDS.names, *record_columns[3:]])
    )
    labels = drawn["labels"]
    ground_truth = pl.DataFrame(
        {"id": drawn["id"], "labels": labels, "scores": [[1.0] * len(row) for row in labels]},
        schema=GROUND_TRUTH.polars(),
    )
    boxes = boxes_table(drawn["id"], drawn["box"], config.image_size)
    objects = objects_table(drawn["id"], drawn["objects"], world.classes)
    for name, table, contract in (
        ("ground_truth", ground_truth, GROUND_TRUTH),
        ("records", records, RECORDS),
        ("boxes", boxes, BOXES),
        ("objects", objects, OBJECTS),
    ):
        write_parquet(table, out_dir / f"{name}.parquet", stage="datasets", params=params, contract=contract)


def draw_records(dataset: str, n_records: int, rng, world: SceneWorld, style: SceneStyle, image_dir: Path) -> dict:
    """Draw and save `n_records` scenes; return their columns (id, image_path, captions, image_sha256, scene,
    dominant_object, labels, box, objects: [(class index, drawn box)]), each a list in record order."""
    drawn: dict[str, list] = {name: [] for name in ("id", "image_path", "captions", "image_sha256", "scene")}
    drawn |= {"dominant_object": [], "labels": [], "box": [], "objects": []}
    for index in tqdm(range(n_records), desc=f"generating {dataset}", unit="img", mininterval=2):
        scene = int(rng.integers(len(SCENES)))
        objects = world.sample_objects(scene, rng)
        image, dominant, box, object_boxes = world.render_objects(scene, objects, rng, style)
        record_id = f"{dataset}-{index:07d}"
        image.save(image_dir / f"{record_id}.png")
        drawn["id"].append(record_id)
        drawn["image_path"].append(f"images/{record_id}.png")
        drawn["captions"].append([world.caption(scene, objects, rng)])
        drawn["image_sha256"].append(content_hash(image))
        drawn["scene"].append(SCENES[scene])
        drawn["dominant_object"].append(world.classes[dominant])
        drawn["labels"].append(sorted(world.classes[i] for i in objects))
        drawn["box"].append(box)
        drawn["objects"].append(object_boxes)
    return drawn


def boxes_table(ids: list[str], boxes: list[tuple[int, int, int, int]], size: int) -> pl.DataFrame:
    """The BOXES table: one row per record, its dominant object's drawn box."""
    x_min, y_min, x_max, y_max = zip(*boxes) if boxes else ((), (), (), ())
    columns = {"id": ids, "image_width": [size] * len(ids), "image_height": [size] * len(ids)}
    columns |= {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}
    return pl.DataFrame(columns, schema=BOXES.polars())


def objects_table(
    ids: list[str], objects: list[list[tuple[int, tuple[int, int, int, int]]]], classes: list[str]
) -> pl.DataFrame:
    """The OBJECTS table: one row per drawn object (records in order, each image's objects in `objects` order),
    its class name and drawn box."""
    rows = [
        (record_id, classes[class_index], *box) for record_id, drawn in zip(ids, objects) for class_index, box in drawn
    ]
    return pl.DataFrame(rows, schema=OBJECTS.polars(), orient="row") if rows else OBJECTS.empty()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="dataset name, used as the id prefix")
    parser.add_argument("--n-records", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--out-dir",
        required=True,
        help="folder for records.parquet, ground_truth.parquet, boxes.parquet, objects.parquet, images/",
    )
    add_dataclass_arguments(parser, SyntheticConfig)
    add_dataclass_arguments(parser, SceneStyle)
    args = parser.parse_args(argv)
    config = dataclass_from_args(SyntheticConfig, args)
    generate(args.dataset, args.n_records, args.seed, config, args.out_dir, dataclass_from_args(SceneStyle, args))


if __name__ == "__main__":
    main()
