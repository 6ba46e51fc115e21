"""Turn a user's query (a tactile image, or text) into a vector plus the space it lives in.

Used by the search CLI and TouchQA, so a query is encoded exactly as the database was: the same
ImageBind encoder (checked by fingerprint) and, for tactile images, the trained projector with the
image's sensor id.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tasks.embed import encoder_spec
from tasks.encoders import ImageBindEncoder, preprocess_image
from tasks.params import Params
from tasks.projector_model import projector_from_checkpoint
from tasks.projector_train import project
from tasks.retrieval import QuerySpace
from tasks.stage import StageError


class QueryEncoder:
    def __init__(self, params: Params):
        self.encoder = ImageBindEncoder(encoder_spec(params.embed))
        projected_meta = params.projector.projected_dir / "meta.json"
        checkpoint = params.projector.out_dir / "projector.pt"
        self.projector = None
        self.projector_hash = None
        if checkpoint.is_file():
            self.projector = projector_from_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True))
            if projected_meta.is_file():
                self.projector_hash = json.loads(projected_meta.read_text())["projector_hash"]

    def tactile(self, path: Path | str, sensor_id: int | None = None) -> tuple[np.ndarray, QuerySpace]:
        """Embed a tactile image and, when a projector is trained, project it into RGB space."""
        try:
            with Image.open(path) as img:
                pixels = preprocess_image(img).unsqueeze(0)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise StageError(f"{path}: cannot read tactile image ({type(exc).__name__}: {exc})") from None
        vector = self.encoder.encode_images(pixels).numpy()
        if self.projector is None:
            return vector[0], QuerySpace("raw", vector.shape[1], self.encoder.fingerprint)
        sensors = np.array([-1 if sensor_id is None else sensor_id])
        projected = project(self.projector, vector, sensors)
        return projected[0], QuerySpace("projected", projected.shape[1], self.encoder.fingerprint, self.projector_hash)

    def text(self, text: str) -> tuple[np.ndarray, QuerySpace]:
        vector = self.encoder.encode_texts([text]).numpy()
        return vector[0], QuerySpace("raw", vector.shape[1], self.encoder.fingerprint)
