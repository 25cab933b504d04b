"""One reader of a real site's images for every stage (``ingest``, ``fit-vae``, ``profile``).

A catalog row names five channel TIFFs (``URL_Orig<channel>``, local paths, ``file://`` or ``s3://`` URIs) and,
on JUMP plates processed with illumination correction, five illumination functions (``URL_Illum<channel>``,
JUMP's per-plate ``.npy`` files). :class:`SiteReader` fetches them (the S3 requests of a batch go out
concurrently through one client), checks each TIFF from its header before decoding (uint16 only, at most
``max_plane_bytes`` decoded; :func:`cpldm_core.images.decode_tiff`), stacks the channels (one shape) and checks
the illumination functions against the image. A site that fails any check is an :class:`ImageError` naming
the file and the reason, which the stages record as a rejects row; the batch goes on.

Illumination, one default everywhere (``auto``): a site is divided by its ``URL_Illum*`` functions when the
catalog lists them (CellProfiler's ``CorrectIlluminationApply``, method Divide) and left as is otherwise, so
the profiles of real images are measured on the same corrected images the model learns from.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict

import numpy as np

from cpldm_core import images as im
from cpldm_core.images import ImageError
from storage_schemas.columns import CHANNELS

#: Illumination functions kept per reader (one plate's 5 arrays each).
ILLUM_CACHE_PLATES = 4


class SiteReader:
    """Reads sites (5 TIFFs + optional illumination functions) from local paths or S3.

    Args:
        endpoint_url: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
        max_plane_bytes: largest decoded plane accepted (bytes), checked from the TIFF header.
    """

    def __init__(self, endpoint_url: str | None = None, max_plane_bytes: int = im.DEFAULT_MAX_PLANE_BYTES):
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.max_plane_bytes = int(max_plane_bytes)
        self._s3 = None
        self._illum: OrderedDict = OrderedDict()

    # -- bytes
    def fetch(self, uris: list[str]) -> list[bytes | Exception]:
        """Bytes of each URI (an exception object in place of a file that cannot be read)."""
        out: list[bytes | Exception] = [b""] * len(uris)
        s3_idx = [i for i, u in enumerate(uris) if u.startswith("s3://")]
        for i, u in enumerate(uris):
            if i in s3_idx:
                continue
            try:
                with open(u[7:] if u.startswith("file://") else u, "rb") as fh:
                    out[i] = fh.read()
            except OSError as exc:
                out[i] = exc
        if s3_idx:
            if self._s3 is None:
                from pipelines.storage import s3_filesystem
                self._s3 = s3_filesystem(self.endpoint_url)
            paths = [uris[i][5:] for i in s3_idx]
            got = self._s3.cat(paths, on_error="return")
            for i, p in zip(s3_idx, paths):
                out[i] = got.get(p, FileNotFoundError(p))
        return out

    def illum_for(self, urls: tuple[str, ...]) -> np.ndarray:
        """``(5, H, W) float32`` illumination functions of ``urls`` (cached per plate)."""
        if urls not in self._illum:
            arrays = []
            for u, data in zip(urls, self.fetch(list(urls))):
                if isinstance(data, Exception):
                    raise ImageError(f"{u}: cannot read illumination function ({type(data).__name__}: {data})")
                try:
                    arrays.append(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
                except Exception as exc:
                    raise ImageError(f"{u}: not a .npy illumination function ({exc})") from None
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise ImageError(f"{urls[0]}: illumination functions of one site have different shapes {shapes}")
            self._illum[urls] = np.stack(arrays)
            while len(self._illum) > ILLUM_CACHE_PLATES:
                self._illum.popitem(last=False)
        return self._illum[urls]

    # -- sites
    def read_raw(self, rows: list[dict], with_illumination: bool = True
                 ) -> list[tuple[np.ndarray, np.ndarray | None] | ImageError]:
        """Each row -> ``((5, H, W) uint16 pixels, (5, H, W) float32 illumination or None)``, or the ImageError
        why not. The illumination functions are read when ``with_illumination`` and the row names all five
        (``URL_Illum*``)."""
        uris = [str(r[f"URL_Orig{ch}"]) for r in rows for ch in CHANNELS]
        blobs = self.fetch(uris)
        out: list = []
        for k, r in enumerate(rows):
            try:
                chans = []
                for j, ch in enumerate(CHANNELS):
                    data, uri = blobs[5 * k + j], uris[5 * k + j]
                    if isinstance(data, Exception):
                        raise ImageError(f"{uri}: cannot read ({type(data).__name__}: {data})")
                    chans.append(im.decode_tiff(data, uri, self.max_plane_bytes))
                img = im.stack_channels(chans, list(CHANNELS))
                urls = tuple(str(r.get(f"URL_Illum{ch}") or "") for ch in CHANNELS)
                illum = self.illum_for(urls) if with_illumination and all(urls) else None
                if illum is not None and illum.shape != img.shape:
                    raise ImageError(f"{urls[0]}: illumination function shape {illum.shape} does not match the "
                                     f"image {img.shape}")
                out.append((img, illum))
            except ImageError as exc:
                out.append(exc)
        return out

    def read_sites(self, rows: list[dict], illumination: str = "auto") -> list[np.ndarray | ImageError]:
        """Each row -> ``(5, H, W) float32`` grey levels, illumination-corrected (``auto``: when the row names
        functions; ``off``/``none``: never), or the ImageError why not."""
        out: list = []
        for got in self.read_raw(rows, with_illumination=illumination == "auto"):
            if isinstance(got, ImageError):
                out.append(got)
                continue
            img, illum = got
            if illumination == "auto" and illum is not None:
                out.append(im.apply_illumination(img, illum))
            else:
                out.append(img.astype(np.float32))
        return out
