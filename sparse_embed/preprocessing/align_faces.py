"""Detects and aligns the faces of an image tree into a mirrored tree of aligned JPEG crops.

    python -m sparse_embed.preprocessing.align_faces --input=$LFW_DIR/lfw \\
        --output=$LFW_DIR/lfw_112x112 --workers=8

Every image under --input becomes `--output/<same relative path>.jpg`, the
face warped by a five-point similarity transform onto the ArcFace 112x112
template (--crop=96x112: the SphereFace / MLPerf one). The five points are
the dataset's (--landmarks: an LFW landmark file, a VGGFace2 loose_landmark
CSV, a MegaFace image folder of <image>.json files) or MTCNN's; --policy picks
the face when MTCNN finds several. Images without a face are listed, not
replaced, unless --fallback=center_crop. The tree is the --input of build_tfrecords.py.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from sparse_embed.cli import deprecated_alias, make_parser, user_errors_exit
from sparse_embed.data import format_summary
from sparse_embed.errors import ConfigError
from sparse_embed.faces.align import TEMPLATES
from sparse_embed.faces.aligner import FALLBACKS, POLICIES, align_tree
from sparse_embed.faces.landmarks import LANDMARK_FORMATS


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.preprocessing.align_faces`."""
    parser = make_parser(__doc__, "python -m sparse_embed.preprocessing.align_faces")
    # Checked in main, not by argparse, so a missing one is a one-line error like any other.
    parser.add_argument("--input", default=None, help="Top of the image tree (required).")
    parser.add_argument("--output", default=None, help="Top of the aligned tree, created (required).")
    parser.add_argument("--landmarks", default=None,
                        help="Dataset landmark file (or MegaFace folder) used instead of detection.")
    parser.add_argument("--landmarks_format", default=None, choices=LANDMARK_FORMATS.names(),
                        help="Format of --landmarks; detected from the file when not given.")
    parser.add_argument("--crop", default="112x112", choices=TEMPLATES.names(),
                        help="Crop template, width x height.")
    deprecated_alias(parser, "--size", "--crop")
    parser.add_argument("--policy", default="center", choices=POLICIES.names(),
                        help="Which face to keep when there are several.")
    parser.add_argument("--fallback", default=None, choices=FALLBACKS.names(),
                        help="What a face-less image gets; by default nothing (it is listed).")
    parser.add_argument("--min_face_size", type=int, default=20,
                        help="Smallest face searched for, in pixels.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Processes, each with its own detector.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, align the tree, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    for flag, what in (("input", "the image tree"), ("output", "where the crops go")):
        if getattr(args, flag) is None:
            raise ConfigError(f"--{flag} is required: {what}")
    summary = align_tree(args.input, args.output, crop=args.crop, policy=args.policy,
                         landmarks=args.landmarks, landmarks_format=args.landmarks_format,
                         fallback=args.fallback, workers=args.workers, min_face_size=args.min_face_size)
    rows = [(key, summary[key]) for key in ("input", "output", "crop", "policy", "images", "aligned")]
    sources = (("from_landmarks", "from landmarks"), ("detected", "detected"),
               ("eyes_nose", "from eyes, nose"))
    rows += [(f"  {label}", summary[key]) for key, label in sources if summary[key]]
    rows += [("several faces", summary["several_faces"]), ("no face", summary["no_face"])]
    rows += [("  no face", name) for name in summary["no_face_examples"]]
    if args.fallback is not None:
        rows.append((f"fallback {args.fallback}", summary["fallback"]))
    rows.append(("unreadable", summary["unreadable"]))
    rows += [("  unreadable", name) for name in summary["unreadable_examples"]]
    if args.landmarks is not None:
        rows.append(("missing (landmarks, no image)", summary["missing"]))
        rows += [("  missing", name) for name in summary["missing_examples"]]
    rows.append(("crops written", summary["crops"]))
    print(format_summary("Face alignment", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
