"""DVC stage ``sample``: the deterministic offline sample dataset in the SSVTP layout (the default data).

Writes ``data/sample/images_tac/image_{id}_tac.jpg``, ``images_rgb/image_{id}_rgb.jpg``, ``captions.csv``
(``index,caption,sensor``) and ``split.csv`` (``index,split``), rendered from hidden materials
(core: touchvl.data.sample), validated before anything is written.
"""
from __future__ import annotations

import logging

from touchvl.data.sample import generate, validation_tables, write_dataset
from touchvl import checks  # light: Great Expectations is imported only when it runs
from touchvl.logs import run_stage
from touchvl.params import Params

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    def body(params: Params, args) -> None:

        p = params.sample
        items, captions, split = generate(p)
        checks.run_validation("sample", validation_tables(items, captions, split, p), params.validation).raise_if_failed()
        write_dataset(items, captions, split, p.out_dir)
        log.info("wrote %d ids (%d test) to %s", len(items), (split["split"] == "test").sum(), p.out_dir)

    run_stage("sample", __doc__, body, argv, start=checks.stage_starts)


if __name__ == "__main__":
    main()
