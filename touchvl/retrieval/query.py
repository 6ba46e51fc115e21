"""Turn a user's query (a tactile image, or text) into a vector plus the space it lives in.

Used by the search CLI and TouchQA, so a query is encoded exactly as the database was: the same
ImageBind encoder (checked by fingerprint) and, for tactile images, the pixels prepare would have published
(touchvl.imagefile: EXIF orientation applied, 16/32-bit samples scaled, ``prepare.max_image_pixels`` as the cap)
and the trained projector with the image's sensor id.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from touchvl import disk, imagefile
from touchvl.imagebind.encoder import ImageBindEncoder, encoder_spec
from touchvl.params import Params
from touchvl.projector.model import projector_from_checkpoint
from touchvl.projector.training import project
from touchvl.retrieval.index import QuerySpace


def decode_query(path: Path | str, max_pixels: int) -> imagefile.Decoded:
    """A tactile query image as prepare would publish it, or StageError naming the file and the reason (``corrupt_image``,
    ``image_too_large`` over ``prepare.max_image_pixels``). Cheap: the CLI calls it before building any model, so a bad
    file fails in a second, not after the encoder's load."""
    return imagefile.decode(path, max_pixels, "prepare.max_image_pixels", where=f"tactile image {path}")


class QueryEncoder:
    def __init__(self, params: Params):
        self.max_pixels = params.prepare.max_image_pixels
        self.encoder = ImageBindEncoder(encoder_spec(params.embed))
        projected_meta = params.projector.projected_dir / "meta.json"
        checkpoint = params.projector.out_dir / "projector.pt"
        self.projector = None
        self.projector_hash = None
        if checkpoint.is_file():
            self.projector = projector_from_checkpoint(disk.read_checkpoint(checkpoint))
            self.projector_hash = (disk.read_json(projected_meta) or {}).get("projector_hash")

    def tactile(self, path: Path | str, sensor_id: int | None = None) -> tuple[np.ndarray, QuerySpace]:
        """Embed a tactile image and, when a projector is trained, project it into RGB space."""
        decoded = decode_query(path, self.max_pixels)
        if decoded.as_stored and self.encoder.spec.fast_decode:
            # a file prepare publishes as stored, as embed reads it: the fast path decodes the JPEG at a DCT scale
            with Image.open(path) as img:
                pixels = self.encoder.preprocess(img).unsqueeze(0)
        else:
            pixels = self.encoder.preprocess(decoded.rgb).unsqueeze(0)  # the transform the gallery was embedded with
        vector = self.encoder.encode_images(pixels).numpy()
        if self.projector is None:
            return vector[0], QuerySpace("raw", vector.shape[1], self.encoder.fingerprint)
        sensors = np.array([-1 if sensor_id is None else sensor_id])
        projected = project(self.projector, vector, sensors)
        return projected[0], QuerySpace("projected", projected.shape[1], self.encoder.fingerprint, self.projector_hash)

    def text(self, text: str) -> tuple[np.ndarray, QuerySpace]:
        vector = self.encoder.encode_texts([text]).numpy()
        return vector[0], QuerySpace("raw", vector.shape[1], self.encoder.fingerprint)
