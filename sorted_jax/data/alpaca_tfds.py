"""TFDS builder for Stanford Alpaca (52K records), written as ``array_record``.

Prepared from the official release file ``alpaca_data.json`` (downloaded from
:data:`ALPACA_URL`, or taken from ``manual_dir`` when offline), so training reads it with
``load_records("tfds:stanford_alpaca", data_dir=...)`` without TensorFlow. Only the ``train``
split exists; hold out an eval set with :func:`sorted_jax.data.sources.holdout_split`.

``tensorflow_datasets`` (``pip install 'sorted_jax[tfds]'``) is imported only when the builder
is first needed (`register`, `prepare_alpaca`, or the `StanfordAlpaca` attribute), so the rest
of ``sorted_jax.data`` imports this module without it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from sorted_jax.data.records import read_json_records

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
ALPACA_FILE = "alpaca_data.json"
NAME = "stanford_alpaca"


@functools.cache
def register() -> type:
    """Define (once) and return the builder class; defining it registers `NAME` with TFDS."""
    import tensorflow_datasets as tfds  # heavy optional package

    class StanfordAlpaca(tfds.core.GeneratorBasedBuilder):
        """Stanford Alpaca instruction data: instruction / input / output text features."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "alpaca_data.json from tatsu-lab/stanford_alpaca."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            f"Offline: put {ALPACA_FILE} (from {ALPACA_URL}) in the manual dir "
            "(default <data_dir>/downloads/manual)."
        )
        pkg_dir_path = Path(__file__).parent  # no per-dataset metadata files to read

        def _info(self) -> Any:
            text = tfds.features.Text()
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {"instruction": text, "input": text, "output": text}
                ),
                homepage="https://github.com/tatsu-lab/stanford_alpaca",
                description="52K instruction-following records (Taori et al., 2023), "
                            "CC BY-NC 4.0.",
            )

        def _split_generators(self, dl_manager: Any):
            try:
                path = Path(dl_manager.manual_dir) / ALPACA_FILE
            except AssertionError:  # no manual dir: download the release file
                path = None
            if path is None or not path.is_file():
                path = Path(dl_manager.download(ALPACA_URL))
            return {"train": self._generate_examples(path)}

        def _generate_examples(self, path: Path):
            # read_json_records checks every record and names file:line on a malformed one.
            yield from enumerate(read_json_records(path))

    return StanfordAlpaca


def __getattr__(name: str) -> Any:
    if name == "StanfordAlpaca":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_alpaca(data_dir: str, manual_dir: str | None = None) -> Any:
    """Download (or read from ``manual_dir``) and write the dataset under ``data_dir``."""
    import tensorflow_datasets as tfds  # heavy optional package

    builder = register()(data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=config)
    return builder
