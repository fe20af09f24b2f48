"""Triangle mesh utilities for reconstruction: normals, Laplacian, topology, tangents, UVs and export.

Meshes are plain arrays: ``verts`` [V, 3] float and ``faces`` [F, 3] int64, counter-clockwise seen
from outside. Functions marked "torch" are differentiable; topology helpers accept torch tensors
or numpy arrays.

UV convention: inside the workbench, uv (0, 0) is the corner of texture row 0 (the TOP row of an
image array), i.e. ``v`` grows downwards like image rows. OBJ files put v = 0 at the BOTTOM of the
image, so :func:`write_obj` writes ``vt = (u, 1 - v)`` and :func:`load_mesh` flips back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import csgraph
from scipy.spatial import cKDTree

# ----------------------------------------------------------------------------- helpers


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def safe_normalize(x: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    """Unit vectors along the last axis; zero vectors stay finite (no NaN in values or gradients)."""
    return x / torch.sqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=eps))


def _unique_edges_np(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges [E, 2] (sorted pairs) and how many faces use each [E]."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(edges, axis=0, return_counts=True)


def _vertex_components(n_verts: int, faces: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the vertex graph (vertices joined by face edges)."""
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    adj = sparse.coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n_verts, n_verts))
    return csgraph.connected_components(adj, directed=False)


# ----------------------------------------------------------------------------- normals


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit face normals ``normalize(cross(v1 - v0, v2 - v0))`` (torch, differentiable).

    Args:
        verts: float [V, 3]; faces: int64 [F, 3].

    Returns:
        float [F, 3] (zero-area faces give a zero vector).
    """
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return safe_normalize(torch.cross(v1 - v0, v2 - v0, dim=-1))


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (torch, differentiable).

    Each face adds its unnormalised cross product (2 x area x normal) to its three vertices.
    Vertices with no (or only degenerate) faces get (0, 0, 1).

    Args:
        verts: float [V, 3]; faces: int64 [F, 3].

    Returns:
        float [V, 3].
    """
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    acc = torch.zeros_like(verts)
    for k in range(3):
        acc = acc.index_add(0, faces[:, k], fn)
    length2 = (acc * acc).sum(dim=-1, keepdim=True)
    fallback = torch.tensor([0.0, 0.0, 1.0], dtype=verts.dtype, device=verts.device).expand_as(acc)
    return torch.where(length2 > 1e-20, safe_normalize(acc), fallback)


# ----------------------------------------------------------------------------- Laplacian


def laplacian_uniform(n_verts: int, faces: torch.Tensor) -> torch.Tensor:
    """Uniform (umbrella) graph Laplacian ``L = I - D^-1 A`` as a sparse COO tensor.

    ``(L @ v)_i = v_i - mean of v over the neighbours of i``. Isolated vertices get an all-zero row.

    Args:
        n_verts: V.
        faces: int64 [F, 3] (device of the result).

    Returns:
        sparse float32 [V, V] (coalesced).
    """
    device = faces.device
    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    e = torch.cat([e, e.flip(1)], dim=0)
    e = torch.unique(e, dim=0)  # each directed neighbour pair once
    deg = torch.zeros(n_verts, dtype=torch.float32, device=device).index_add(
        0, e[:, 0], torch.ones(e.shape[0], dtype=torch.float32, device=device)
    )
    has_nb = deg > 0
    diag = torch.arange(n_verts, device=device)[has_nb]
    rows = torch.cat([e[:, 0], diag])
    cols = torch.cat([e[:, 1], diag])
    vals = torch.cat([-1.0 / deg[e[:, 0]], torch.ones(diag.shape[0], dtype=torch.float32, device=device)])
    indices = torch.stack([rows, cols])
    return torch.sparse_coo_tensor(indices, vals, (n_verts, n_verts), check_invariants=False).coalesce()


def laplacian_loss(
    verts: torch.Tensor, ref_verts: torch.Tensor, faces: torch.Tensor, laplacian: torch.Tensor | None = None
) -> torch.Tensor:
    """Relative Laplacian smoothness loss (nvdiffrec's "relative" mode).

    ``mean_i || (L v)_i - (L v_ref)_i ||^2`` with the uniform Laplacian, i.e. it penalises changes
    of the local shape relative to a reference (zero when ``verts == ref_verts``).

    Args:
        verts: float [V, 3] current vertices; ref_verts: float [V, 3] reference vertices.
        faces: int64 [F, 3].
        laplacian: optional precomputed :func:`laplacian_uniform` (reuse it when faces are fixed).

    Returns:
        scalar tensor (differentiable w.r.t. ``verts``).
    """
    if laplacian is None:
        laplacian = laplacian_uniform(verts.shape[0], faces)
    d = verts - ref_verts.detach()
    lap = torch.sparse.mm(laplacian.to(d.dtype), d)
    return (lap * lap).sum(dim=-1).mean()


# ----------------------------------------------------------------------------- topology


def keep_large_components(verts, faces, min_fraction: float = 0.01):
    """Drop connected components with fewer than ``min_fraction`` of all faces.

    Connectivity is through shared vertices. The largest component is always kept. Unreferenced
    vertices are removed and faces reindexed.

    Args:
        verts: [V, 3] (torch or numpy); faces: [F, 3] (same kind).
        min_fraction: minimum face-count fraction of a kept component.

    Returns:
        (verts, faces) of the same type/device as the inputs (torch gradients flow to kept verts).
    """
    f = _to_numpy(faces).astype(np.int64)
    n_verts = verts.shape[0]
    if len(f) == 0:
        return verts, faces
    _, labels = _vertex_components(n_verts, f)
    face_label = labels[f[:, 0]]
    counts = np.bincount(face_label, minlength=labels.max() + 1)
    keep_comp = counts >= min_fraction * len(f)
    keep_comp[np.argmax(counts)] = True
    keep_face = keep_comp[face_label]
    f = f[keep_face]
    used = np.unique(f)
    remap = -np.ones(n_verts, dtype=np.int64)
    remap[used] = np.arange(len(used))
    new_faces = remap[f]
    if isinstance(verts, torch.Tensor):
        idx = torch.from_numpy(used).to(verts.device)
        ftype = faces.dtype if isinstance(faces, torch.Tensor) else torch.long
        return verts[idx], torch.from_numpy(new_faces).to(device=verts.device, dtype=ftype)
    return np.asarray(verts)[used], new_faces.astype(np.asarray(faces).dtype)


def euler_characteristic(verts, faces) -> int:
    """Euler characteristic ``V - E + F`` counting only vertices referenced by a face.

    Args:
        verts: [V, 3] (unused except for API symmetry); faces: [F, 3] torch or numpy.
    """
    f = _to_numpy(faces).astype(np.int64)
    if len(f) == 0:
        return 0
    edges, _ = _unique_edges_np(f)
    return int(len(np.unique(f)) - len(edges) + len(f))


def _boundary_loops(faces: np.ndarray) -> int:
    edges, counts = _unique_edges_np(faces)
    b = edges[counts == 1]
    if len(b) == 0:
        return 0
    nodes, inv = np.unique(b, return_inverse=True)
    inv = inv.reshape(-1, 2)
    n, _ = csgraph.connected_components(
        sparse.coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])), shape=(len(nodes), len(nodes))),
        directed=False,
    )
    return int(n)


def genus(verts, faces) -> int:
    """Total genus of an orientable manifold mesh: ``sum_c g_c = (2 C - chi - B) / 2``.

    C = connected components (of referenced vertices), chi = :func:`euler_characteristic`,
    B = boundary loops (0 for closed meshes; then each component has g_c = (2 - chi_c) / 2).
    A sphere gives 0, a torus 1, two spheres 0. Meshes with UV seams split into separate
    vertices should be welded first (:func:`weld_vertices`).

    Args:
        verts: [V, 3]; faces: [F, 3] torch or numpy.
    """
    f = _to_numpy(faces).astype(np.int64)
    if len(f) == 0:
        return 0
    used = np.unique(f)
    n_comp, labels = _vertex_components(verts.shape[0], f)
    n_comp = len(np.unique(labels[used]))
    chi = euler_characteristic(verts, f)
    return int(round((2 * n_comp - chi - _boundary_loops(f)) / 2))


def is_watertight(faces) -> bool:
    """True when every undirected edge is shared by exactly two faces (and there is a face).

    Args:
        faces: [F, 3] torch or numpy.
    """
    f = _to_numpy(faces).astype(np.int64)
    if len(f) == 0:
        return False
    _, counts = _unique_edges_np(f)
    return bool(np.all(counts == 2))


def is_consistently_oriented(faces) -> bool:
    """True when no directed edge occurs twice (neighbouring faces have compatible winding).

    Args:
        faces: [F, 3] torch or numpy.
    """
    f = _to_numpy(faces).astype(np.int64)
    directed = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    return len(np.unique(directed, axis=0)) == len(directed)


def weld_vertices(verts, faces, tol: float = 1e-6):
    """Merge vertices closer than ``tol`` (e.g. an OBJ split at UV seams) and drop collapsed faces.

    Clusters are the connected components of the "closer than tol" graph; each cluster takes the
    position of its first vertex.

    Args:
        verts: [V, 3]; faces: [F, 3] (torch or numpy, same kind).
        tol: merge distance.

    Returns:
        (verts [V', 3], faces [F', 3]) of the same type as the inputs; ``V' <= V``.
    """
    v = _to_numpy(verts).astype(np.float64)
    f = _to_numpy(faces).astype(np.int64)
    pairs = cKDTree(v).query_pairs(tol, output_type="ndarray")
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(v), len(v)))
    n, labels = csgraph.connected_components(graph, directed=False)
    first = np.full(n, len(v), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(v)))
    new_f = labels[f]
    ok = (new_f[:, 0] != new_f[:, 1]) & (new_f[:, 1] != new_f[:, 2]) & (new_f[:, 2] != new_f[:, 0])
    new_f = new_f[ok]
    if isinstance(verts, torch.Tensor):
        return verts[torch.from_numpy(first).to(verts.device)], torch.from_numpy(new_f).to(verts.device)
    return np.asarray(verts)[first], new_f


# ----------------------------------------------------------------------------- tangents and UVs


def compute_tangents(
    verts: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, uv_faces: torch.Tensor, normals: torch.Tensor
) -> torch.Tensor:
    """Per-vertex tangents (direction of increasing u) for tangent-space normal maps (torch).

    Per face, ``T = (e1 * dv2 - e2 * dv1) / (du1 * dv2 - du2 * dv1)`` from the edge vectors and
    UV deltas; faces with (near) degenerate UVs are skipped. Face tangents are normalised,
    area-weighted onto vertices, Gram-Schmidt orthogonalised against the vertex normal and
    normalised. Vertices without a usable tangent get an arbitrary unit vector orthogonal to the
    normal.

    Args:
        verts: float [V, 3]; faces: int64 [F, 3].
        uvs: float [Vt, 2]; uv_faces: int64 [F, 3] (may equal ``faces``).
        normals: float [V, 3] unit vertex normals (indexed by ``faces``).

    Returns:
        float [V, 3] unit tangents with ``dot(t, n) ~ 0``.
    """
    p0, p1, p2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    t0, t1, t2 = uvs[uv_faces[:, 0]], uvs[uv_faces[:, 1]], uvs[uv_faces[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    d1, d2 = t1 - t0, t2 - t0
    denom = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = denom.abs() > 1e-12
    safe = torch.where(ok, denom, torch.ones_like(denom))
    tan = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) / safe[:, None]
    area = torch.linalg.norm(torch.cross(e1, e2, dim=-1), dim=-1, keepdim=True)
    tan = safe_normalize(tan) * area * ok[:, None].to(tan.dtype)
    acc = torch.zeros_like(verts)
    for k in range(3):
        acc = acc.index_add(0, faces[:, k], tan)
    acc = acc - normals * (acc * normals).sum(dim=-1, keepdim=True)

    # Fallback: cross the normal with the coordinate axis it is least aligned with.
    axes = torch.eye(3, dtype=verts.dtype, device=verts.device)
    least = axes[normals.abs().argmin(dim=-1)]
    fallback = safe_normalize(torch.cross(normals, least, dim=-1))
    length2 = (acc * acc).sum(dim=-1, keepdim=True)
    return torch.where(length2 > 1e-20, safe_normalize(acc), fallback)


def unwrap_uv(verts, faces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Automatic UV atlas with xatlas.

    Args:
        verts: float [V, 3]; faces: int [F, 3] (numpy or torch).

    Returns:
        vmapping: int64 [N] original vertex index of each new vertex (seams duplicate vertices);
        faces_new: int64 [F, 3] indices into the new vertices (same face order as ``faces``);
        uvs: float32 [N, 2] in [0, 1] (xatlas's convention, v = 0 at the top row of the atlas).
    """
    import xatlas

    v = np.ascontiguousarray(_to_numpy(verts), dtype=np.float32)
    f = np.ascontiguousarray(_to_numpy(faces), dtype=np.uint32)
    vmapping, indices, uvs = xatlas.parametrize(v, f)
    return vmapping.astype(np.int64), indices.astype(np.int64), uvs.astype(np.float32)


# ----------------------------------------------------------------------------- IO


def _save_png(path: Path, image) -> None:
    from PIL import Image

    img = _to_numpy(image).astype(np.float32)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    img8 = np.clip(np.rint(np.nan_to_num(img) * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(img8).save(path)


_TEXTURE_FILES = {"kd": "texture_kd.png", "ks": "texture_ks.png", "n": "texture_n.png"}
_TEXTURE_ALIASES = {"normal": "n", "texture_kd": "kd", "texture_ks": "ks", "texture_n": "n"}


def write_obj(
    folder,
    verts,
    faces,
    uvs=None,
    normals=None,
    material_name: str = "material",
    textures: dict | None = None,
) -> Path:
    """Write ``mesh.obj`` + ``mesh.mtl`` (+ texture PNGs) into ``folder``.

    Per-vertex attributes share the face indexing (as after :func:`unwrap_uv`, with
    ``verts = verts[vmapping]``), so faces are written ``f i/i/i``. UVs are given in the workbench
    convention (v = 0 at image row 0, the top) and written as ``vt u (1 - v)`` because OBJ puts
    v = 0 at the bottom of the image.

    Textures (``textures`` keys ``"kd"``, ``"ks"``, ``"n"``): float arrays [H, W, 3] in [0, 1],
    already in the colour space to store (the caller sRGB-encodes kd; ks, nvdiffrec's packed
    occlusion/roughness/metalness, and the tangent-space normal map (encoded n * 0.5 + 0.5) are
    stored linearly), row 0 = top. They are written as 8-bit PNGs ``texture_kd.png``,
    ``texture_ks.png``, ``texture_n.png`` and referenced as ``map_Kd``, ``map_Ks`` and ``bump``.

    Args:
        folder: output directory (created).
        verts: float [V, 3]; faces: int [F, 3]; uvs: float [V, 2] or None; normals: float [V, 3] or None.
        material_name: ``newmtl`` / ``usemtl`` name.
        textures: optional dict of texture arrays.

    Returns:
        Path of ``mesh.obj``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    v = _to_numpy(verts).astype(np.float64)
    f = _to_numpy(faces).astype(np.int64) + 1
    vt = None if uvs is None else _to_numpy(uvs).astype(np.float64)
    vn = None if normals is None else _to_numpy(normals).astype(np.float64)

    lines = ["# workbench.recon mesh", "mtllib mesh.mtl"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
    if vt is not None:
        lines += [f"vt {u:.6f} {1.0 - w:.6f}" for u, w in vt]
    if vn is not None:
        lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vn]
    lines.append(f"usemtl {material_name}")
    if vt is not None and vn is not None:
        lines += [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in f]
    elif vt is not None:
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f]
    elif vn is not None:
        lines += [f"f {a}//{a} {b}//{b} {c}//{c}" for a, b, c in f]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in f]
    obj_path = folder / "mesh.obj"
    obj_path.write_text("\n".join(lines) + "\n")

    mtl = [f"newmtl {material_name}", "Ka 0 0 0", "Kd 1 1 1", "Ks 0 0 0", "Ns 10", "illum 2"]
    for key, image in (textures or {}).items():
        key = _TEXTURE_ALIASES.get(key, key)
        if key not in _TEXTURE_FILES:
            raise ValueError(f"unknown texture {key!r}; expected one of {sorted(_TEXTURE_FILES)}")
        name = _TEXTURE_FILES[key]
        _save_png(folder / name, image)
        mtl.append({"kd": "map_Kd", "ks": "map_Ks", "n": "bump"}[key] + f" {name}")
    (folder / "mesh.mtl").write_text("\n".join(mtl) + "\n")
    return obj_path


def write_ply(path, verts, faces, vertex_colors=None) -> Path:
    """Write a binary little-endian PLY (float xyz, optional uchar rgb, ``list uchar int`` faces).

    Args:
        path: output file.
        verts: float [V, 3]; faces: int [F, 3]; vertex_colors: uint8 [V, 3] or None
            (floats in [0, 1] are scaled to 0..255).

    Returns:
        the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    v = _to_numpy(verts).astype("<f4")
    f = _to_numpy(faces).astype("<i4")
    vdtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(v)}"]
    header += ["property float x", "property float y", "property float z"]
    if vertex_colors is not None:
        c = _to_numpy(vertex_colors)
        if c.dtype != np.uint8:
            c = np.clip(np.rint(c * 255.0) if c.dtype.kind == "f" else c, 0, 255)
        c = c.astype(np.uint8)
        vdtype += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    vrec = np.empty(len(v), dtype=vdtype)
    vrec["x"], vrec["y"], vrec["z"] = v[:, 0], v[:, 1], v[:, 2]
    if vertex_colors is not None:
        vrec["red"], vrec["green"], vrec["blue"] = c[:, 0], c[:, 1], c[:, 2]
    frec = np.empty(len(f), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    frec["n"] = 3
    frec["idx"] = f
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(vrec.tobytes())
        fh.write(frec.tobytes())
    return path


def load_mesh(path):
    """Load a (textured) mesh with trimesh.

    trimesh splits OBJ vertices at UV seams, so UVs are per vertex and ``uv_faces`` is ``faces``.
    UVs are returned in the workbench convention (v = 0 at image row 0): ``v = 1 - v_obj``.

    Args:
        path: mesh file (OBJ with MTL/texture, PLY, GLB, ...).

    Returns:
        verts float32 [V, 3], faces int64 [F, 3], uvs float32 [V, 2] or None, uv_faces int64
        [F, 3] or None, texture float32 [H, W, 3] in [0, 1] (row 0 = top) or None.
    """
    import trimesh

    mesh = trimesh.load(str(path), process=False, force="mesh")
    verts = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    uvs = uv_faces = texture = None
    visual = getattr(mesh, "visual", None)
    uv = getattr(visual, "uv", None)
    if uv is not None and len(uv) == len(verts):
        uvs = np.asarray(uv, dtype=np.float32).copy()
        uvs[:, 1] = 1.0 - uvs[:, 1]
        uv_faces = faces.copy()
    material = getattr(visual, "material", None)
    image = None
    if material is not None:
        image = getattr(material, "image", None)
        if image is None:
            image = getattr(material, "baseColorTexture", None)
    if image is not None:
        texture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return verts, faces, uvs, uv_faces, texture
