"""Feeding a finished output directory to a training loop: batching, sharding over workers, PyTorch.

Pre-tiled images have a variable number of tiles (InternVL, LLaVA, DeepSeek) or patches (Qwen) each, so a
batch cannot be a plain `np.stack`. The models' own collators concatenate every image's views along the
first axis and pass the per-image counts alongside, so that the model can split them again; `collate`
does the same and never pads, because padding would change what the vision encoder sees.

Shards, not records, are the unit of parallel reading: a shard file is read sequentially by exactly one
(rank, DataLoader worker) pair, so every record is read once per epoch without any coordination between
processes. `split_shards` is that assignment; `torch_dataset` applies it inside PyTorch's DataLoader.

PyTorch is optional: nothing here imports it until `torch_dataset` or `collate_torch` is called.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np

from .dataset import Dataset
from .errors import VlmtileError

if TYPE_CHECKING:
    import torch  # type: ignore[import-not-found, unused-ignore]

__all__ = ["collate", "collate_packed", "collate_torch", "split_shards", "torch_dataset"]

_BATCH_FIELDS = frozenset({"keys", "images_per_record", "split_sizes"})
"""Names `collate` adds itself: a record field of one of these names would be ambiguous, so it is refused."""

_PER_IMAGE_FIELDS = frozenset({"pixel_values", "key", "num_tiles", "image_grid_thw"})
"""Record fields `collate` turns into per-image outputs instead of passing them through per record."""

_TORCH_MISSING = "this needs PyTorch, which vlmtile does not install: pip install torch"


# -- batching ---------------------------------------------------------------------------------------------


def _images_of(
    record: Mapping[str, Any], index: int
) -> tuple[list[np.ndarray] | None, list[Mapping[str, Any]]]:
    """(arrays, per-image metadata) of one record in either layout; arrays None without pixels.

    "image" layout (plain folders): the record *is* the image's metadata. "sample" layout (manifests, tar
    and Parquet inputs): `pixel_values` is a list with one array per image and `images` the matching list of
    metadata dicts. A metadata-only output (`pixels=False`) has the same records without `pixel_values`.
    """
    images = record.get("images")
    if images is not None and (
        not isinstance(images, list | tuple) or not all(isinstance(m, Mapping) for m in images)
    ):
        raise ValueError(f"record {index}: 'images' must be a list of metadata dicts")
    if "pixel_values" not in record:
        return None, [record] if images is None else list(images)
    pixels = record["pixel_values"]
    if isinstance(pixels, np.ndarray):
        return [pixels], [record]
    if not isinstance(pixels, list | tuple):
        raise ValueError(
            f"record {index}: 'pixel_values' must be an array (image layout) or a list of arrays "
            f"(sample layout), got {type(pixels).__name__}"
        )
    if images is None or len(images) != len(pixels):
        got = "none" if images is None else len(images)
        raise ValueError(
            f"record {index}: sample layout needs 'images' with one metadata dict per array "
            f"({len(pixels)} arrays, images: {got})"
        )
    for position, array in enumerate(pixels):
        if not isinstance(array, np.ndarray):
            raise ValueError(
                f"record {index} image {position}: expected an array, got {type(array).__name__}"
            )
    return list(pixels), list(images)


def _views(array: np.ndarray, where: str) -> np.ndarray:
    """The array as a stack of views along axis 0: what concatenating means for its layout.

    vlmtile writes three layouts: (N, 3, H, W) tiles, (N, D) flattened patches, and (3, H, W) single
    canvases (XComposer). A canvas is one view, so it becomes (1, 3, H, W): two same-size canvases then
    batch as (2, 3, H, W), never as a (6, H, W) array that mixes channels into the batch axis.
    """
    if array.ndim == 3:
        return array[None]
    if array.ndim in (2, 4):
        return array
    raise ValueError(
        f"{where}: pixel_values of shape {array.shape} is not a vlmtile layout "
        "((N, 3, H, W) tiles, (N, D) patches or a (3, H, W) canvas)"
    )


def collate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch records with different numbers of tiles per image, the way the models' own collators do.

    Accepts records of either layout `open_dataset` yields (see `Dataset`), even mixed. Returns:

    - `pixel_values`: every image's array, in record order then image order, concatenated along axis 0
      (InternVL / LLaVA / DeepSeek tiles -> (total_tiles, 3, H, W); Qwen patches -> (total_patches, D);
      same-size canvases -> (num_images, 3, H, W)). When the images do not share their trailing dims
      (XComposer-4KHD / 2.5 canvases of different sizes) it is the list of arrays instead: padding them to
      one shape would feed the encoder pixels the model never saw in its own preprocessing. Iterating
      either form gives per-image views, so `for image in pixel_values` works in both cases. With no image
      in the batch (text-only samples) it is an empty list. Records of a metadata-only output
      (`pixels=False`) have no arrays: the batch then has no `pixel_values` and no `split_sizes`, and
      the rest as usual (to plan token budgets, for instance).
    - `split_sizes` (only when `pixel_values` is an array): rows of `pixel_values` per image, so that
      `np.split(pixel_values, np.cumsum(split_sizes)[:-1])` gives each image's array back. It equals
      `num_tiles` for tiled models, but not for Qwen (one "tile", many patch rows) or canvases.
    - `num_tiles`: the strategy's view count per image (list[int], one entry per image).
    - `images_per_record`: list[int], one entry per record (always 1 in image layout).
    - `image_grid_thw`: when the images carry it (Qwen), an int64 array of shape (num_images, 3).
    - `keys`: the record keys.
    - every other record field (source, shape, orig_width, ..., or in sample layout `images`, `sample`,
      `num_tokens`), as a list with one entry per record; None where a record lacks the field.

    In sample layout a record's own `num_tiles` is the sum over its images; the per-image values above
    replace it. Arrays of different dtypes are refused (ValueError) rather than silently promoted: a batch
    mixing raw uint8 pixels with normalized floats would train on garbage.
    """
    if len(records) == 0:
        raise ValueError("collate needs at least one record")
    packed = ["segment_ids" in record for record in records]
    if any(packed):
        if not all(packed):
            raise ValueError("a batch must not mix packed sequences with image or sample records")
        return collate_packed(records)
    arrays: list[np.ndarray] = []
    with_pixels: list[bool] = []
    metas: list[Mapping[str, Any]] = []
    images_per_record: list[int] = []
    keys: list[Any] = []
    fields: dict[str, list[Any]] = {}
    for index, record in enumerate(records):
        if "key" not in record:
            raise ValueError(f"record {index} has no 'key'")
        record_arrays, record_metas = _images_of(record, index)
        with_pixels.append(record_arrays is not None)
        arrays += record_arrays or []
        metas += record_metas
        images_per_record.append(len(record_metas))
        keys.append(record["key"])
        for name in record:
            if name in _PER_IMAGE_FIELDS:
                continue
            if name in _BATCH_FIELDS:
                raise ValueError(f"record {index} has a field {name!r}, which collate computes itself")
            fields.setdefault(name, [None] * index)
        for name, values in fields.items():
            values.append(record.get(name))

    num_tiles: list[int] = []
    for position, meta in enumerate(metas):
        tiles = meta.get("num_tiles")
        if not isinstance(tiles, int | np.integer) or isinstance(tiles, bool):
            raise ValueError(f"image {position} of the batch has no integer 'num_tiles' (got {tiles!r})")
        num_tiles.append(int(tiles))

    batch: dict[str, Any] = {}
    if any(with_pixels) and not all(with_pixels):
        raise ValueError(
            f"{with_pixels.count(False)} of {len(records)} records have no pixel_values: "
            "a batch must not mix a metadata-only output with one that has pixels"
        )
    if all(with_pixels):
        batch["pixel_values"] = []
    batch["num_tiles"] = num_tiles
    if arrays:
        dtypes = {a.dtype for a in arrays}
        if len(dtypes) > 1:
            raise ValueError(f"pixel_values of different dtypes in one batch: {sorted(map(str, dtypes))}")
        views = [_views(a, f"image {position} of the batch") for position, a in enumerate(arrays)]
        if len({v.shape[1:] for v in views}) == 1:
            batch["pixel_values"] = np.concatenate(views, axis=0)
            batch["split_sizes"] = [v.shape[0] for v in views]
        else:
            batch["pixel_values"] = arrays

    with_thw = [meta.get("image_grid_thw") is not None for meta in metas]
    if any(with_thw):
        if not all(with_thw):
            raise ValueError(
                f"image_grid_thw is present for {sum(with_thw)} of {len(metas)} images; "
                "a batch must not mix strategies"
            )
        thw = np.asarray([meta["image_grid_thw"] for meta in metas], dtype=np.int64)
        if thw.shape != (len(metas), 3):
            raise ValueError(f"image_grid_thw must be (t, h, w) per image, got an array of shape {thw.shape}")
        batch["image_grid_thw"] = thw

    batch["images_per_record"] = images_per_record
    batch["keys"] = keys
    batch.update(fields)
    return batch


_PACKED_ARRAYS = ("pixel_values", "segment_ids", "positions")


def collate_packed(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch packed sequences (`vlmtile pack`; `collate` sends them here). They all have N rows, so:

    - `pixel_values` (B, N, D), `segment_ids` (B, N), `positions` (B, N, 2): stacked;
    - `cu_seqlens`: one int32 array over the batch flattened to B*N rows, for variable-length kernels that
      take a (B*N, ...) input: each sequence's boundaries shifted by b*N, and its padding (if any) as a
      segment of its own so that the boundaries stay contiguous (its outputs are to be ignored);
    - `image_grid_thw` (Qwen inputs): the segments' (t, h, w) rows of all sequences, (segments, 3);
    - every other field (keys, num_tokens, ...) as a list with one entry per sequence.
    """
    lengths = {len(record["segment_ids"]) for record in records}
    if len(lengths) != 1:
        raise ValueError(f"packed sequences of different lengths in one batch: {sorted(lengths)}")
    (n,) = lengths
    batch: dict[str, Any] = {name: np.stack([r[name] for r in records]) for name in _PACKED_ARRAYS}
    bounds = [np.zeros(1, dtype=np.int32)]
    for b, record in enumerate(records):
        cu = np.asarray(record["cu_seqlens"], dtype=np.int32)
        bounds.append(cu[1:] + b * n)
        if cu[-1] < n:
            bounds.append(np.asarray([(b + 1) * n], dtype=np.int32))
    batch["cu_seqlens"] = np.concatenate(bounds)
    if all("image_grid_thw" in record for record in records):
        batch["image_grid_thw"] = np.asarray(
            [thw for record in records for thw in record["image_grid_thw"]], dtype=np.int64
        ).reshape(-1, 3)
    for name in records[0]:
        if name not in batch:
            batch[name] = [record.get(name) for record in records]
    return batch


# -- sharding ---------------------------------------------------------------------------------------------


def _int(name: str, value: object) -> int:
    """`value` if it is an int (not a bool): a float rank would make the modulo split silently wrong."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def _check_slot(rank: object, world_size: object, worker: object, num_workers: object) -> None:
    world, workers = _int("world_size", world_size), _int("num_workers", num_workers)
    if world < 1:
        raise ValueError(f"world_size must be at least 1, got {world}")
    if workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {workers}")
    if not 0 <= _int("rank", rank) < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if not 0 <= _int("worker", worker) < workers:
        raise ValueError(f"worker must be in [0, {workers}), got {worker}")


def split_shards(
    shards: Sequence[str], *, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards one (rank, worker) pair reads: shard i goes to slot i % (world_size * num_workers).

    The slot of a pair is `rank * num_workers + worker`. The split depends on nothing but its arguments,
    so every process computes its own share without talking to the others, and the shares of all pairs
    are disjoint and together the whole list (in its order). Round-robin rather than contiguous blocks
    keeps the shares within one shard of each other in size.

    With fewer shards than slots, the surplus pairs get an empty list: that is not an error (a worker
    with nothing to read simply ends), but those workers idle, so write at least
    world_size * num_workers shards (`--shard-size`) to use them all. Shards hold different numbers of
    records (the last one is short), so ranks may see different numbers of batches per epoch; under DDP
    bound the steps per epoch or use `torch.distributed.algorithms.Join`.
    """
    if isinstance(shards, str):
        raise ValueError("shards must be a sequence of paths, not one string")
    _check_slot(rank, world_size, worker, num_workers)
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    return [shard for i, shard in enumerate(shards) if i % slots == slot]


# -- PyTorch ----------------------------------------------------------------------------------------------


def _import_torch() -> Any:
    """PyTorch, imported on first use so that vlmtile works (and type-checks) without it."""
    try:
        return importlib.import_module("torch")
    except ImportError as e:
        raise ImportError(_TORCH_MISSING) from e


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise VlmtileError(f"environment variable {name}={value!r} is not an integer") from None


class _ShardedRecords:
    """What `torch_dataset`'s IterableDataset does, written without a torch base class.

    `torch_dataset` mixes it with `torch.utils.data.IterableDataset` at run time, so that importing this
    module, and type-checking it, never needs PyTorch.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        as_stored: bool,
        shuffle_shards: bool,
        seed: int,
        rank: int | None,
        world_size: int | None,
    ) -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if rank is not None and world_size is not None:
            _check_slot(rank, world_size, 0, 1)
        if _int("seed", seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.dataset = Dataset(path, as_stored=as_stored)
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order of the next pass (with `shuffle_shards`); call it before each epoch.

        DataLoader workers get a copy of the dataset when an iteration starts, so this must be called
        before `iter(loader)`, and it has no effect on `persistent_workers=True` loaders after their first
        epoch.
        """
        if _int("epoch", epoch) < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """Every shard, permuted by (seed, epoch) when shuffling: the same list in every process.

        The permutation must not depend on the rank or worker, or the split would stop being disjoint;
        seeding with the pair (seed, epoch) rather than seed + epoch keeps (0, 1) and (1, 0) different.
        """
        shards = self.dataset.shard_paths
        if not self.shuffle_shards:
            return shards
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(shards))
        return [shards[i] for i in order]

    def placement(self, torch: Any) -> tuple[int, int]:
        """(rank, world_size): given ones, else torch.distributed's, else $RANK / $WORLD_SIZE, else (0, 1)."""
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        return (0 if rank is None else rank), (1 if world_size is None else world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        torch = _import_torch()
        rank, world_size = self.placement(torch)
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (int(info.id), int(info.num_workers))
        shards = split_shards(
            self.shard_order(), rank=rank, world_size=world_size, worker=worker, num_workers=num_workers
        )
        for shard in shards:
            yield from self.dataset.iter_shard(shard)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by rebuilding: the class is made at run time, and the rank is fixed in the parent.

        Spawned or forkserver DataLoader workers do not inherit an initialized process group, so they
        could not find their rank themselves; pickling happens in the parent, which still knows it.
        """
        rank, world_size = self.placement(_import_torch())
        state = (self.dataset.path, self.dataset.as_stored, self.shuffle_shards, self.seed, self.epoch)
        return (_rebuild, (*state, rank, world_size))


if TYPE_CHECKING:
    # What `torch_dataset` returns, for type checkers only: the real class is made by `_torch_class` when
    # torch is first needed. Without torch installed, torch is Any here and the base is unchecked.
    _TorchIterableDataset: TypeAlias = torch.utils.data.IterableDataset[dict[str, Any]]

    class VlmtileIterableDataset(_ShardedRecords, _TorchIterableDataset):  # type: ignore[misc, unused-ignore]
        pass


def _rebuild(
    path: str, as_stored: bool, shuffle_shards: bool, seed: int, epoch: int, rank: int, world_size: int
) -> VlmtileIterableDataset:
    dataset = torch_dataset(
        path, as_stored=as_stored, shuffle_shards=shuffle_shards, seed=seed, rank=rank, world_size=world_size
    )
    dataset.set_epoch(epoch)
    return dataset


@functools.cache
def _torch_class() -> type:
    """`_ShardedRecords` + `torch.utils.data.IterableDataset`, made once per process."""
    torch = _import_torch()
    namespace = {"__module__": __name__, "__doc__": _ShardedRecords.__doc__}
    return type("VlmtileIterableDataset", (_ShardedRecords, torch.utils.data.IterableDataset), namespace)


def torch_dataset(
    path: str | os.PathLike[str],
    *,
    as_stored: bool = False,
    shuffle_shards: bool = False,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> VlmtileIterableDataset:
    """A `torch.utils.data.IterableDataset` over an output directory, sharded over ranks and workers.

    Each iteration finds its DataLoader worker (`get_worker_info`) and its rank and world size (the
    `rank` / `world_size` given here, else an initialized `torch.distributed`, else the RANK / WORLD_SIZE
    variables torchrun sets, else 0 of 1), and reads the shards `split_shards` gives that pair, so across
    all ranks and workers every record comes out exactly once per epoch. `shuffle_shards` permutes the
    shards by (seed, epoch) first; call `.set_epoch(epoch)` before each epoch, with the same seed on every
    rank. Records within a shard keep their stored order; add a shuffle buffer if you need more mixing.

    Records are yielded as `open_dataset` gives them, pixels as numpy arrays (`as_stored` as there), so
    that batching stays the caller's choice: `DataLoader(ds, batch_size=8, collate_fn=collate_torch)`.
    With `batch_size=None` the DataLoader converts each record's arrays with its own `default_convert`,
    which refuses numpy's bfloat16 (ml_dtypes): for `as_stored=True` bfloat16 data use a `batch_size`
    (1 for single records) with `collate_fn=collate_torch`.
    There is no `len()`: how many records one rank sees depends on the split.

    Raises ImportError (naming `pip install torch`) without PyTorch, VlmtileError for a directory that is
    not a finished output.
    """
    dataset = _torch_class()(
        path, as_stored=as_stored, shuffle_shards=shuffle_shards, seed=seed, rank=rank, world_size=world_size
    )
    return cast("VlmtileIterableDataset", dataset)


def _tensor(torch: Any, array: np.ndarray) -> Any:
    """`torch.from_numpy`, plus the two cases it does not handle.

    numpy has no bfloat16: ml_dtypes' type is opaque to torch, so its bits go through int16 and are
    reinterpreted (`.view`), which is exact. Read-only arrays (an as-stored canvas straight from a
    Parquet buffer) are copied: torch would share memory it is not allowed to write, and warn.
    """
    if not array.flags.writeable:
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def collate_torch(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`collate`, with `pixel_values` (array or list of arrays) and `image_grid_thw` as torch tensors.

    Tensors share memory with `collate`'s freshly concatenated arrays (no second copy); float16 and
    bfloat16 arrive as torch.float16 / torch.bfloat16 with the stored bits unchanged.
    """
    torch = _import_torch()
    batch = collate(records)
    pixels = batch.get("pixel_values")
    if isinstance(pixels, np.ndarray):
        batch["pixel_values"] = _tensor(torch, pixels)
    elif pixels is not None:
        batch["pixel_values"] = [_tensor(torch, array) for array in pixels]
    if "image_grid_thw" in batch:
        batch["image_grid_thw"] = _tensor(torch, batch["image_grid_thw"])
    for name in ("segment_ids", "positions", "cu_seqlens"):  # packed sequences
        if name in batch:
            batch[name] = _tensor(torch, batch[name])
    return batch
