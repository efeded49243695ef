"""Export MTCNN's P-, R- and O-Net (the `mtcnn` package's weights) to TFLite, for detection on the device.

    python -m sparse_embed.faces.mtcnn_tflite --output=models/mtcnn

writes `pnet.tflite`, `rnet.tflite` and `onet.tflite` (float32, about 2 MB
together), which `sparse_embed.edge.mtcnn.TFLiteMTCNN` runs with the LiteRT
interpreter alone, e.g. `python -m sparse_embed.edge.lfw --align=models/mtcnn ...`.

The package builds its networks as subclassed Keras models, which
`TFLiteConverter.from_keras_model` refuses (their input shapes are not set),
and converting their concrete function together with the model as trackable
object gives a file without weights (NaN outputs). Each network is therefore
traced as a plain function of its input and converted from that concrete
function alone, which freezes the weights into the file. The batch dimension
stays dynamic (R- and O-Net take every box of a stage at once), and so do
P-Net's height and width: the detector resizes its input per pyramid scale.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from absl import logging as absl_logging

from sparse_embed.cli import deprecated_alias, make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError
from sparse_embed.fileio import atomic_path


def export_mtcnn(output_dir: str | os.PathLike) -> dict[str, Path]:
    """Converts the three MTCNN networks to `<output_dir>/<name>.tflite`.

    Args:
        output_dir: Destination directory (created if needed); existing files
            of the same names are replaced, each only once its conversion succeeded.

    Returns:
        Network name ("pnet", "rnet", "onet") -> the file written.

    Raises:
        ConfigError: If `output_dir` exists and is not a directory.
    """
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"--output {output_dir} is a file; pass a directory for the .tflite files")
    from sparse_embed.faces.detect import NETWORK_INPUT_SIDES, mtcnn_networks
    from sparse_embed.keras import tf

    written = {}
    for name, network in mtcnn_networks().items():
        side = NETWORK_INPUT_SIDES[name]
        function = tf.function(lambda x, network=network: network(x), autograph=False,
                               input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32)])
        # Without a trackable object the converter freezes the variables into constants
        # (module docstring); the deprecation notice it logs for this path is silenced.
        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()])
        finally:
            absl_logging.set_verbosity(verbosity)
        path = Path(output_dir) / f"{name}.tflite"
        with atomic_path(path) as tmp:
            tmp.write_bytes(converter.convert())
        written[name] = path
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.faces.mtcnn_tflite`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--output", required=True,
                        help="Directory for pnet.tflite, rnet.tflite, onet.tflite.")
    deprecated_alias(parser, "--output_dir", "--output")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Exports the networks and prints one line per file.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    for name, path in export_mtcnn(args.output).items():
        print(f"{name}: {path} ({path.stat().st_size / 1024:.0f} KiB)")


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
