"""Multi-view image sets with cameras: the input of the reconstruction pipeline.

Two layouts are read (``docs/recon-inputs.md`` documents both for users):

1. **NeRF-synthetic**: ``transforms_{split}.json`` next to RGBA images
   (``frames[].file_path`` relative to the folder, extension optional,
   ``frames[].transform_matrix`` an OpenGL camera-to-world matrix, and either
   ``camera_angle_x`` or ``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h``).
2. **Images + masks + cameras**: ``images/*.png|jpg``, optional
   ``masks/<stem>.png`` (white = object; needed when the images have no alpha),
   and cameras in ``cameras.json`` (OpenCV/COLMAP convention, see
   :func:`_read_cameras_json`) or a COLMAP text model
   (``sparse/0/cameras.txt`` + ``images.txt``).

Everything ends as a :class:`MultiViewDataset`: linear-RGB + alpha images
``[N, H, W, 4]`` and OpenGL cameras (camera looks down -Z, +Y up).  Pixel
coordinates follow COLMAP: the top-left corner of the image is (0, 0), so the
centre of pixel (col i, row j) is (i + 0.5, j + 0.5) and a centred principal
point is (W / 2, H / 2).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from workbench.errors import InputNotFound, InvalidFormat

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Every ``TEST_EVERY``-th image (index 0, 8, 16, ...) is the test split of an
#: images + cameras folder that says nothing about splits.
TEST_EVERY = 8
_RIGID_TOL = 1e-3


# --------------------------------------------------------------------------- colour


def srgb_to_linear(x):
    """sRGB-encoded values in [0, 1] to linear (IEC 61966-2-1); numpy or torch, any shape."""
    if isinstance(x, torch.Tensor):
        x = x.clamp(0.0, 1.0)
        return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x):
    """Linear values to sRGB encoding, clamped to [0, 1]; numpy or torch, any shape."""
    if isinstance(x, torch.Tensor):
        x = x.clamp(0.0, 1.0)
        return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(1e-8) ** (1 / 2.4) - 0.055)
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.maximum(x, 1e-8) ** (1 / 2.4) - 0.055).astype(np.float32)


# --------------------------------------------------------------------------- cameras


def perspective(fovy: float, aspect: float = 1.0, near: float = 0.1, far: float = 1000.0) -> torch.Tensor:
    """OpenGL perspective projection with the y row negated (clip +y maps to image row 0, the top).

    Args:
        fovy: vertical field of view in radians.
        aspect: width / height.
        near, far: clip planes (positive distances).

    Returns:
        Tensor [4, 4] float32.
    """
    t = math.tan(fovy / 2.0)
    return torch.tensor(
        [
            [1.0 / (t * aspect), 0.0, 0.0, 0.0],
            [0.0, -1.0 / t, 0.0, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -(2.0 * far * near) / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ],
        dtype=torch.float32,
    )


def _projection(fx: float, fy: float, cx: float, cy: float, width: int, height: int, near: float, far: float):
    """:func:`perspective` generalised to pixel intrinsics (focal lengths and principal point in pixels).

    With a centred principal point and ``fx == fy`` this is exactly
    ``perspective(fovy, W / H, near, far)``; an off-centre point shifts
    the image through the ``P[0, 2]`` and ``P[1, 2]`` terms.
    """
    return np.array(
        [
            [2.0 * fx / width, 0.0, 1.0 - 2.0 * cx / width, 0.0],
            [0.0, -2.0 * fy / height, 1.0 - 2.0 * cy / height, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -(2.0 * far * near) / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ],
        dtype=np.float64,
    )


# OpenCV camera (x right, y down, looking down +z) <-> OpenGL camera (x right, y up, looking down -z).
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def opencv_to_c2w(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """World-to-camera ``x_cam = R x_world + t`` (OpenCV/COLMAP) to an OpenGL camera-to-world [4, 4]."""
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = t
    return np.linalg.inv(w2c) @ _CV_TO_GL


def c2w_to_opencv(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`opencv_to_c2w`: returns (R [3, 3], t [3]) with ``x_cam = R x_world + t``."""
    w2c = np.linalg.inv(np.asarray(c2w, dtype=np.float64) @ _CV_TO_GL)
    return w2c[:3, :3], w2c[:3, 3]


@dataclass
class MultiViewDataset:
    """Posed images of one object.

    Attributes:
        images: [N, H, W, 4] float32; RGB linear (decoded from sRGB), alpha in [0, 1].
        c2w: [N, 4, 4] float32 OpenGL camera-to-world matrices.
        fovy: [N] float32 vertical field of view in radians (from ``fy`` and ``H``).
        resolution: (H, W).
        names: image names (file stems), N of them.
        source: the folder read.
        focal: [N, 2] float32 (fx, fy) in pixels at ``resolution``.
        principal: [N, 2] float32 (cx, cy) in pixels at ``resolution`` (top-left corner = 0).
    """

    images: torch.Tensor
    c2w: torch.Tensor
    fovy: torch.Tensor
    resolution: tuple[int, int]
    names: list[str]
    source: Path
    focal: torch.Tensor | None = None
    principal: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h, w = self.resolution
        n = self.images.shape[0]
        if self.focal is None:
            fy = 0.5 * h / torch.tan(self.fovy.double() / 2.0)
            self.focal = torch.stack([fy, fy], dim=-1).float()
        if self.principal is None:
            self.principal = torch.tensor([[w / 2.0, h / 2.0]] * n, dtype=torch.float32).reshape(n, 2)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def mvp(self, near: float = 0.1, far: float = 1000.0) -> torch.Tensor:
        """Model-view-projection matrices ``P @ inverse(c2w)``, [N, 4, 4] float32 on the images' device.

        ``P`` is :func:`perspective` built from each view's focal lengths, with
        the principal-point offset folded into ``P[0, 2]`` and ``P[1, 2]``.
        """
        h, w = self.resolution
        c2w = self.c2w.detach().cpu().double().numpy()
        foc = self.focal.detach().cpu().double().numpy()
        pp = self.principal.detach().cpu().double().numpy()
        out = np.stack(
            [
                _projection(foc[i, 0], foc[i, 1], pp[i, 0], pp[i, 1], w, h, near, far) @ np.linalg.inv(c2w[i])
                for i in range(len(self))
            ]
        )
        return torch.from_numpy(out).float().to(self.c2w.device)

    @property
    def campos(self) -> torch.Tensor:
        """Camera centres in world space, [N, 3]."""
        return self.c2w[:, :3, 3]

    def subset(self, idx: Sequence[int] | torch.Tensor | slice) -> "MultiViewDataset":
        """The views at ``idx`` (indices, boolean mask or slice) as a new dataset."""
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        idx_t = torch.as_tensor(idx)
        if idx_t.dtype == torch.bool:
            idx_t = torch.nonzero(idx_t).flatten()
        idx_t = idx_t.long().flatten()
        sel = idx_t.tolist()
        return replace(
            self,
            images=self.images[idx_t.to(self.images.device)],
            c2w=self.c2w[idx_t.to(self.c2w.device)],
            fovy=self.fovy[idx_t.to(self.fovy.device)],
            focal=self.focal[idx_t.to(self.focal.device)],
            principal=self.principal[idx_t.to(self.principal.device)],
            names=[self.names[i] for i in sel],
            meta=dict(self.meta),
        )

    def to(self, device: torch.device | str) -> "MultiViewDataset":
        """The same views with every tensor on ``device``."""
        return replace(
            self,
            images=self.images.to(device),
            c2w=self.c2w.to(device),
            fovy=self.fovy.to(device),
            focal=self.focal.to(device),
            principal=self.principal.to(device),
        )


# --------------------------------------------------------------------------- entry point


@dataclass
class _View:
    """One view before loading: where its image (and mask) are and its pinhole camera."""

    name: str
    image: Path
    c2w: np.ndarray
    fx: float
    fy: float
    cx: float | None  # None: centre of the image
    cy: float | None
    size: tuple[int, int] | None = None  # (W, H) the intrinsics refer to; None: the image's own
    mask: Path | None = None
    camera_file: Path | None = None
    focal_per_width: bool = False  # fx, fy are fractions of the image width (camera_angle_x)


def load_multiview(
    path: str | Path,
    split: str = "train",
    resolution: int | None = None,
    min_views: int | None = None,
) -> MultiViewDataset:
    """Read a multi-view folder (NeRF-synthetic, or images + masks + cameras).

    Args:
        path: the folder.
        split: ``"train"`` or ``"test"``.  NeRF-synthetic folders use
            ``transforms_{split}.json`` (``transforms_val.json`` stands in for a missing
            test file).  Images + cameras folders take the split from
            ``cameras.json`` entries' ``"split"`` keys or a ``test.txt`` list of image
            names when present, else every 8th image (0, 8, 16, ...) is the test split.
        resolution: when given, resize so that the short side has this many pixels
            (aspect kept, area filtering on premultiplied colour); intrinsics are scaled.
        min_views: fewer views raise :class:`InvalidFormat`; default 4 for train, 1 for test.

    Returns:
        A :class:`MultiViewDataset` on the CPU.

    Raises:
        InputNotFound: the folder, an image or a mask is missing.
        InvalidFormat: no cameras file, bad cameras, missing alpha/masks, inconsistent
            sizes, empty masks or too few views.  Messages name the offending file.
    """
    root = Path(path).expanduser()
    if split not in ("train", "test"):
        raise InvalidFormat(f"Unknown split {split!r} for {root}", "Use split='train' or split='test'.")
    if not root.exists():
        raise InputNotFound(f"Multi-view folder not found: {root}", "Check the path to the image folder.")
    if not root.is_dir():
        raise InvalidFormat(
            f"Expected a folder of images and cameras, got a file: {root}",
            "Give the folder holding transforms_train.json, or images/ with cameras.json or sparse/0/.",
        )
    if min_views is None:
        min_views = 4 if split == "train" else 1

    if (root / "transforms_train.json").exists() or (root / f"transforms_{split}.json").exists():
        views, fmt = _nerf_views(root, split), "nerf-synthetic"
    else:
        views, fmt = _images_folder_views(root, split)

    if len(views) < min_views:
        raise InvalidFormat(
            f"Only {len(views)} {split} view(s) in {root}, at least {min_views} are needed",
            "Add more images with cameras (30 or more around the object work best).",
        )
    ds = _load_views(root, views, resolution)
    ds.meta["format"] = fmt
    ds.meta["split"] = split
    return ds


# --------------------------------------------------------------------------- format 1: NeRF-synthetic


def _nerf_views(root: Path, split: str) -> list[_View]:
    tf = root / f"transforms_{split}.json"
    if not tf.exists() and split == "test" and (root / "transforms_val.json").exists():
        tf = root / "transforms_val.json"
    if not tf.exists():
        raise InvalidFormat(
            f"No transforms_{split}.json in {root}",
            f"A NeRF-synthetic folder needs transforms_{split}.json next to its images.",
        )
    meta = _read_json(tf)
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list):
        raise InvalidFormat(f"{tf} has no 'frames' list", "Each frame needs file_path and transform_matrix.")
    views = []
    for k, frame in enumerate(frames):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise InvalidFormat(
                f"Frame {k} of {tf} lacks 'file_path' or 'transform_matrix'",
                "Each frame needs file_path (relative to the folder) and a 4x4 transform_matrix.",
            )
        rel = str(frame["file_path"])
        image = _find_image(root / rel)
        if image is None:
            raise InputNotFound(
                f"Image {rel!r} of frame {k} in {tf} not found (tried {', '.join(IMAGE_SUFFIXES)})",
                "Check file_path in the transforms file; it is relative to the folder holding it.",
            )
        c2w = _matrix(frame["transform_matrix"], (4, 4), tf, f"frame {k} transform_matrix")
        _check_c2w(c2w, tf, f"frame {k} ({rel})")

        def get(key: str, frame=frame):
            return frame.get(key, meta.get(key))

        w, h = get("w"), get("h")
        size = (int(w), int(h)) if w is not None and h is not None else None
        if get("fl_x") is not None:
            fx = float(get("fl_x"))
            fy = float(get("fl_y") if get("fl_y") is not None else fx)
            cx = None if get("cx") is None else float(get("cx"))
            cy = None if get("cy") is None else float(get("cy"))
            if size is None:
                raise InvalidFormat(
                    f"{tf} gives fl_x but not the image size w/h it refers to",
                    "Add 'w' and 'h' (pixels) next to fl_x, or use camera_angle_x.",
                )
            K = np.array([[fx, 0, cx or 0.0], [0, fy, cy or 0.0], [0, 0, 1]], dtype=np.float64)
            if not np.all(np.isfinite(K)):
                raise InvalidFormat(f"Non-finite intrinsics for frame {k} in {tf}", "Re-export the cameras.")
            _check_intrinsics(K, tf, f"frame {k} ({rel})")
        elif get("camera_angle_x") is not None:
            angle = float(get("camera_angle_x"))
            if not (math.isfinite(angle) and 0.0 < angle < math.pi):
                raise InvalidFormat(
                    f"camera_angle_x = {angle} in {tf} is not a field of view in (0, pi)",
                    "camera_angle_x is the horizontal field of view in radians.",
                )
            # Focal length relative to the width; resolved against the actual image size later.
            fx = fy = 0.5 / math.tan(angle / 2.0)
            cx = cy = None
        else:
            raise InvalidFormat(
                f"{tf} gives no intrinsics (camera_angle_x or fl_x) for frame {k}",
                "Add camera_angle_x (horizontal field of view, radians) at the top level.",
            )
        views.append(
            _View(
                name=Path(rel).stem,
                image=image,
                c2w=c2w,
                fx=fx,
                fy=fy,
                cx=cx,
                cy=cy,
                size=size,
                mask=_nerf_mask(root, rel),
                camera_file=tf,
                focal_per_width=get("fl_x") is None,
            )
        )
    return views


def _nerf_mask(root: Path, rel: str) -> Path | None:
    rel_path = Path(rel)
    for cand in (
        root / "masks" / rel_path.parent / (rel_path.stem + ".png"),
        root / "masks" / (rel_path.stem + ".png"),
    ):
        if cand.exists():
            return cand
    return None


# --------------------------------------------------------------------------- format 2: images + cameras


def colmap_model_folder(root: str | Path) -> Path | None:
    """The folder of a COLMAP text model under ``root`` (``sparse/0``, ``sparse`` or ``root``), or None."""
    root = Path(root)
    for folder in (root / "sparse" / "0", root / "sparse", root):
        if (folder / "cameras.txt").exists() and (folder / "images.txt").exists():
            return folder
    return None


def _images_folder_views(root: Path, split: str) -> tuple[list[_View], str]:
    images_dir = root / "images"
    cams_json = root / "cameras.json"
    colmap = colmap_model_folder(root)
    if not cams_json.exists() and colmap is None:
        raise InvalidFormat(
            f"No cameras found in {root}: looked for transforms_train.json, cameras.json and "
            "sparse/0/cameras.txt + images.txt",
            "Give a NeRF-synthetic folder, or images/ with cameras.json or a COLMAP text model "
            "(see docs/recon-inputs.md).",
        )
    if not images_dir.is_dir():
        raise InputNotFound(f"No images/ folder in {root}", "Put the photographs in an images/ sub-folder.")
    labels: list[str] | None = None
    if cams_json.exists():
        views, labels, fmt = *_read_cameras_json(root, cams_json), "cameras-json"
    else:
        views, fmt = _read_colmap(root, colmap), "colmap"
    order = sorted(range(len(views)), key=lambda i: views[i].image.name)
    views = [views[i] for i in order]
    labels = [labels[i] for i in order] if labels is not None else None

    masks_dir = root / "masks"
    for v in views:
        if masks_dir.is_dir():
            v.mask = _find_mask(masks_dir, v.image)
            if v.mask is None:
                raise InputNotFound(
                    f"Mask for {v.image.name} not found in {masks_dir} (looked for {v.image.stem}.png)",
                    "Give every image a mask masks/<image stem>.png (white = object), or remove masks/ "
                    "and use images with an alpha channel.",
                )

    # Split: explicit per-entry "split", else test.txt, else every TEST_EVERY-th image.
    test_list = root / "test.txt"
    if labels is not None:
        chosen = [v for v, s in zip(views, labels) if s == split]
    elif test_list.exists():
        names = {ln.strip() for ln in test_list.read_text().splitlines() if ln.strip()}
        is_test = [v.image.name in names or v.image.stem in names for v in views]
        chosen = [v for v, t in zip(views, is_test) if t == (split == "test")]
    else:
        chosen = [v for i, v in enumerate(views) if (i % TEST_EVERY == 0) == (split == "test")]
    return chosen, fmt


def _read_cameras_json(root: Path, path: Path) -> tuple[list[_View], list[str] | None]:
    """Read ``cameras.json``: a list (or ``{"frames": [...]}``) of per-image entries.

    Entry: ``{"file": "images/a.png" or "a.png", "K": 3x3, "R": 3x3, "t": [3],
    "width": W, "height": H, "split": "train"|"test" (optional)}`` with
    ``x_cam = R @ x_world + t`` (OpenCV: camera looks down +Z, +Y down).
    Returns the views and, when any entry has a ``"split"``, each view's split.
    """
    data = _read_json(path)
    entries = data.get("frames") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InvalidFormat(f"{path} is neither a list of cameras nor has a 'frames' list", "See docs/recon-inputs.md.")
    views, labels = [], []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not all(key in e for key in ("file", "K", "R", "t")):
            raise InvalidFormat(
                f"Entry {k} of {path} lacks one of 'file', 'K', 'R', 't'",
                "Each camera needs file, K (3x3), R (3x3), t (3), width and height.",
            )
        rel = str(e["file"])
        image = _find_image(root / rel) or _find_image(root / "images" / rel)
        if image is None:
            raise InputNotFound(
                f"Image {rel!r} of entry {k} in {path} not found",
                "'file' is relative to the dataset folder or to images/.",
            )
        what = f"entry {k} ({rel})"
        K = _matrix(e["K"], (3, 3), path, f"{what} K")
        R = _matrix(e["R"], (3, 3), path, f"{what} R")
        t = _matrix(e["t"], (3,), path, f"{what} t")
        _check_rotation(R, path, what)
        fx, fy, cx, cy = _check_intrinsics(K, path, what)
        size = None
        if e.get("width") is not None and e.get("height") is not None:
            size = (int(e["width"]), int(e["height"]))
        views.append(
            _View(
                name=image.stem,
                image=image,
                c2w=opencv_to_c2w(R, t),
                fx=fx,
                fy=fy,
                cx=cx,
                cy=cy,
                size=size,
                camera_file=path,
            )
        )
        labels.append(str(e.get("split", "")))
    if not any(labels):
        return views, None
    return views, ["test" if s == "test" else "train" for s in labels]


def _read_colmap(root: Path, folder: Path) -> list[_View]:
    """Read a COLMAP text model (``cameras.txt`` + ``images.txt``) in ``folder``."""
    cam_file, img_file = folder / "cameras.txt", folder / "images.txt"
    cameras: dict[int, tuple[float, float, float, float, int, int]] = {}
    for lineno, line in enumerate(cam_file.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tok = line.split()
        try:
            cam_id, model, w, h = int(tok[0]), tok[1].upper(), int(tok[2]), int(tok[3])
            p = [float(x) for x in tok[4:]]
        except (ValueError, IndexError):
            raise InvalidFormat(
                f"Line {lineno} of {cam_file} is not 'ID MODEL W H PARAMS...'", "See docs/recon-inputs.md."
            ) from None
        n_params = {"SIMPLE_PINHOLE": 3, "PINHOLE": 4, "SIMPLE_RADIAL": 4, "RADIAL": 5, "OPENCV": 8}
        if model not in n_params:
            raise InvalidFormat(
                f"Camera model {model} on line {lineno} of {cam_file} is not supported",
                "Use PINHOLE, SIMPLE_PINHOLE, SIMPLE_RADIAL, RADIAL or OPENCV (undistort the images for others).",
            )
        if len(p) < n_params[model]:
            raise InvalidFormat(
                f"Camera {cam_id} in {cam_file} has too few parameters for {model}", "See the COLMAP docs."
            )
        if model in ("PINHOLE", "OPENCV"):
            fx, fy, cx, cy = p[:4]
            dist = p[4:8]
        else:
            fx = fy = p[0]
            cx, cy = p[1], p[2]
            dist = p[3:]
        if any(abs(d) > 0 for d in dist):
            warnings.warn(
                f"{cam_file}: lens distortion of camera {cam_id} ({model}) is ignored; undistort the images "
                "(colmap image_undistorter) for best results",
                stacklevel=3,
            )
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
        _check_intrinsics(K, cam_file, f"camera {cam_id}")
        cameras[cam_id] = (fx, fy, cx, cy, w, h)

    # images.txt: two lines per image; the second (2-D points) may be empty.
    lines = [ln for ln in img_file.read_text().splitlines() if not ln.lstrip().startswith("#")]
    views = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():  # tolerate stray blank lines between records
            i += 1
            continue
        tok = lines[i].split()
        try:
            qw, qx, qy, qz, tx, ty, tz = (float(x) for x in tok[1:8])
            cam_id, name = int(tok[8]), " ".join(tok[9:])
        except (ValueError, IndexError):
            raise InvalidFormat(
                f"Line '{lines[i][:60]}' of {img_file} is not 'ID QW QX QY QZ TX TY TZ CAMERA_ID NAME'",
                "See the COLMAP docs for images.txt.",
            ) from None
        i += 2
        what = f"image {name}"
        q = np.array([qw, qx, qy, qz])
        t = np.array([tx, ty, tz])
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(t))) or np.linalg.norm(q) < 1e-8:
            raise InvalidFormat(f"Non-finite or zero pose for {what} in {img_file}", "Re-export the COLMAP model.")
        if cam_id not in cameras:
            raise InvalidFormat(
                f"{what} in {img_file} uses camera {cam_id}, not in {cam_file}", "Re-export the COLMAP model."
            )
        image = _find_image(root / "images" / name)
        if image is None:
            raise InputNotFound(
                f"Image {name!r} listed in {img_file} not found in {root / 'images'}", "Check the images/ folder."
            )
        fx, fy, cx, cy, w, h = cameras[cam_id]
        views.append(
            _View(
                name=image.stem,
                image=image,
                c2w=opencv_to_c2w(_quat_to_rot(q), t),
                fx=fx,
                fy=fy,
                cx=cx,
                cy=cy,
                size=(w, h),
                camera_file=img_file,
            )
        )
    return views


def _quat_to_rot(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) to a rotation matrix."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def rot_to_quat(R: np.ndarray) -> np.ndarray:
    """Rotation matrix to a unit quaternion (w, x, y, z) with w >= 0 (for writing COLMAP models)."""
    R = np.asarray(R, dtype=np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


# --------------------------------------------------------------------------- loading pixels


def _load_views(root: Path, views: list[_View], resolution: int | None) -> MultiViewDataset:
    images, c2ws, focals, principals = [], [], [], []
    first_size: tuple[int, int] | None = None
    first_name = ""
    for v in views:
        rgba = _read_rgba(v)
        h, w = rgba.shape[:2]
        if first_size is None:
            first_size, first_name = (w, h), v.image.name
        elif (w, h) != first_size:
            raise InvalidFormat(
                f"Image {v.image} is {w}x{h} but {first_name} is {first_size[0]}x{first_size[1]}",
                "All views must have the same size; resize or crop them consistently.",
            )
        if not (rgba[..., 3] > 0.5).any():
            what = v.mask if v.mask is not None else v.image
            raise InvalidFormat(
                f"The mask of {what} is empty (no object pixels)",
                "Masks are white (or alpha opaque) on the object; drop the view or fix its mask.",
            )
        fx, fy, cx, cy = _resolve_intrinsics(v, w, h)
        images.append(rgba)
        c2ws.append(v.c2w)
        focals.append((fx, fy))
        principals.append((cx, cy))

    W, H = first_size
    imgs = torch.from_numpy(np.stack(images))
    focal = torch.tensor(focals, dtype=torch.float64)
    principal = torch.tensor(principals, dtype=torch.float64)
    if resolution is not None and min(H, W) != int(resolution):
        s = int(resolution) / min(H, W)
        new_h, new_w = max(1, round(H * s)), max(1, round(W * s))
        imgs = _resize_rgba(imgs, new_h, new_w)
        scale = torch.tensor([new_w / W, new_h / H], dtype=torch.float64)
        focal, principal = focal * scale, principal * scale
        H, W = new_h, new_w
    fovy = 2.0 * torch.atan(0.5 * H / focal[:, 1])
    return MultiViewDataset(
        images=imgs.float().contiguous(),
        c2w=torch.from_numpy(np.stack(c2ws)).float(),
        fovy=fovy.float(),
        resolution=(H, W),
        names=[v.name for v in views],
        source=root,
        focal=focal.float(),
        principal=principal.float(),
    )


def _resolve_intrinsics(v: _View, w: int, h: int) -> tuple[float, float, float, float]:
    """Pixel intrinsics for an image of w x h, from the view's camera description."""
    if v.focal_per_width:  # camera_angle_x
        return v.fx * w, v.fy * w, w / 2.0, h / 2.0
    fx, fy = v.fx, v.fy
    cx = w / 2.0 if v.cx is None else v.cx
    cy = h / 2.0 if v.cy is None else v.cy
    if v.size is not None and v.size != (w, h):
        sw, sh = w / v.size[0], h / v.size[1]
        if abs(sw / sh - 1.0) > 0.01:
            raise InvalidFormat(
                f"Image {v.image} is {w}x{h} but its camera in {v.camera_file} is for "
                f"{v.size[0]}x{v.size[1]} (a different aspect ratio)",
                "Use the images the cameras were estimated on, or only rescale them uniformly.",
            )
        fx, fy, cx, cy = fx * sw, fy * sh, cx * sw, cy * sh
    return fx, fy, cx, cy


def _read_rgba(v: _View) -> np.ndarray:
    """Image (+ mask) as float32 [H, W, 4]: linear RGB and alpha."""
    try:
        im = Image.open(v.image)
        im.load()
    except Exception as exc:  # PIL raises a variety of errors for broken files
        raise InvalidFormat(f"Cannot read image {v.image}: {exc}", "Use 8- or 16-bit PNG or JPEG images.") from None
    rgb, alpha = _split_pil(im)
    if v.mask is not None:
        try:
            m = Image.open(v.mask)
            m.load()
        except Exception as exc:
            raise InvalidFormat(f"Cannot read mask {v.mask}: {exc}", "Masks are 8- or 16-bit greyscale PNGs.") from None
        if m.size != im.size:
            raise InvalidFormat(
                f"Mask {v.mask} is {m.size[0]}x{m.size[1]} but image {v.image.name} is {im.size[0]}x{im.size[1]}",
                "Each mask must have exactly the size of its image.",
            )
        alpha = _gray(m)
    elif alpha is None:
        raise InvalidFormat(
            f"Image {v.image} has no alpha channel and there is no masks/ folder; "
            "masks are required: add an alpha channel or a masks/ folder",
            "Save RGBA images (alpha channel, transparent background) or add masks/<stem>.png (white = object).",
        )
    return np.concatenate([srgb_to_linear(rgb), alpha[..., None]], axis=-1).astype(np.float32)


def _split_pil(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB in [0, 1] (still sRGB-encoded) and alpha in [0, 1] or None."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        g = _gray(im)
        return np.repeat(g[..., None], 3, axis=-1), None
    if mode in ("LA", "PA", "RGBA", "RGBa", "La"):
        arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        return arr[..., :3], arr[..., 3]
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return arr, None


def _gray(im: Image.Image) -> np.ndarray:
    """A greyscale image (mask) as float32 [H, W] in [0, 1]; 16-bit kept at full precision."""
    if im.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.float32) / 65535.0
    if im.mode == "I":
        arr = np.asarray(im, dtype=np.float32)
        return arr / (65535.0 if arr.max() > 255 else 255.0)
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    if im.mode in ("LA", "RGBA") and np.asarray(im.getchannel("A")).min() < 255:
        # A mask saved as transparency: use its alpha.
        return np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _resize_rgba(imgs: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-filtered resize of [N, H, W, 4] linear RGBA, averaging premultiplied colour."""
    x = imgs.permute(0, 3, 1, 2).double()
    alpha = x[:, 3:4]
    premult = torch.cat([x[:, :3] * alpha, alpha], dim=1)
    small = torch.nn.functional.interpolate(premult, size=(h, w), mode="area")
    a = small[:, 3:4]
    rgb = torch.where(a > 1e-6, small[:, :3] / a.clamp_min(1e-6), torch.zeros_like(small[:, :3]))
    return torch.cat([rgb.clamp(0.0, 1.0), a.clamp(0.0, 1.0)], dim=1).permute(0, 2, 3, 1).float()


# --------------------------------------------------------------------------- validation helpers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidFormat(f"{path} is not valid JSON: {exc}", "Check the file with a JSON validator.") from None


def _matrix(value: Any, shape: tuple[int, ...], path: Path, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != shape:
        raise InvalidFormat(
            f"{what} in {path} is not a {'x'.join(map(str, shape))} array of numbers",
            "Write matrices as nested lists of numbers, rows first.",
        )
    if not np.all(np.isfinite(arr)):
        raise InvalidFormat(f"{what} in {path} has non-finite numbers (NaN or inf)", "Re-export the cameras.")
    return arr


def _check_rotation(R: np.ndarray, path: Path, what: str) -> None:
    det = float(np.linalg.det(R))
    if abs(abs(det) - 1.0) > _RIGID_TOL or np.abs(R @ R.T - np.eye(3)).max() > _RIGID_TOL:
        raise InvalidFormat(
            f"The rotation of {what} in {path} is not orthonormal (det = {det:.4g}); the camera is singular or scaled",
            "Camera rotations must be rigid (orthonormal, det = 1); remove scale or shear from the pose.",
        )


def _check_c2w(c2w: np.ndarray, path: Path, what: str) -> None:
    _check_rotation(c2w[:3, :3], path, what)
    if np.abs(c2w[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > _RIGID_TOL:
        raise InvalidFormat(
            f"The transform_matrix of {what} in {path} has last row {c2w[3].tolist()}, not [0, 0, 0, 1]",
            "transform_matrix must be a rigid 4x4 camera-to-world matrix.",
        )


def _check_intrinsics(K: np.ndarray, path: Path, what: str) -> tuple[float, float, float, float]:
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    if not (fx > 0 and fy > 0) or abs(np.linalg.det(K)) < 1e-12 or np.abs(K[2] - [0, 0, 1]).max() > 1e-6:
        raise InvalidFormat(
            f"The intrinsics K of {what} in {path} are singular or malformed (fx = {fx:g}, fy = {fy:g})",
            "K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with positive focal lengths in pixels.",
        )
    if abs(K[0, 1]) > 1e-6 * fx:
        warnings.warn(f"{path}: skew of {what} is ignored", stacklevel=4)
    return fx, fy, cx, cy


def _find_image(base: Path) -> Path | None:
    """``base`` itself if it is a file, else ``base`` with an image extension appended."""
    if base.is_file():
        return base
    for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
        cand = base.parent / (base.name + suffix)
        if cand.is_file():
            return cand
    return None


def _find_mask(masks_dir: Path, image: Path) -> Path | None:
    for cand in (masks_dir / f"{image.stem}.png", masks_dir / f"{image.name}.png", masks_dir / image.name):
        if cand.is_file():
            return cand
    return None
