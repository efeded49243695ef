"""Aligns the MegaFace distractors and FaceScrub probes of the devkit lists and writes their manifests.

    python -m sparse_embed.preprocessing.prepare_megaface --megaface_root=megaface/FlickrFinal2 \\
        --facescrub_root=facescrub --devkit=devkit/templatelists --list_size=1000000 --list_set=1 \\
        --noises=megaface_testpack --output=data/megaface --workers=8

Reads `megaface_features_list.json_<size>_<set>` and `facescrub_features_list.json` from the
devkit, leaves out the images of InsightFace's noise lists (`--noises`: the folder holding
megaface_noises.txt and facescrub_noises.txt) and the listed images that are not on disk,
aligns the rest (MegaFace: MTCNN inside the box of each image's `.jpg.json`), and writes
`<output>/megaface.tsv` / `<output>/facescrub.tsv` for `python -m sparse_embed.embed --manifest`.
Either root may be left out. See sparse_embed/data/megaface.py for the formats.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from sparse_embed.cli import deprecated_alias, make_parser, user_errors_exit
from sparse_embed.data import format_summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.preprocessing.prepare_megaface`."""
    from sparse_embed.data.megaface import SIZES

    parser = make_parser(__doc__, "python -m sparse_embed.preprocessing.prepare_megaface")
    parser.add_argument("--megaface_root", help="MegaFace's FlickrFinal2 folder (the list's paths' root).")
    parser.add_argument("--facescrub_root", help="The FaceScrub image folder (the list's paths' root).")
    parser.add_argument("--devkit", required=True, help="The MegaFace devkit or its templatelists folder.")
    parser.add_argument("--list_size", type=int, default=1000000, choices=SIZES, help="Distractor list size.")
    deprecated_alias(parser, "--size", "--list_size")
    parser.add_argument("--list_set", type=int, default=1, help="Distractor list set.")
    deprecated_alias(parser, "--set", "--list_set")
    parser.add_argument("--noises", help="Folder with megaface_noises.txt and facescrub_noises.txt.")
    parser.add_argument("--crop", default="112x112", help="Aligned crop: 112x112 or 96x112.")
    parser.add_argument("--output", required=True, help="Output folder.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Processes aligning images.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, prepare the sets, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    from sparse_embed.data.megaface import prepare

    summaries = prepare(args.output, args.devkit, args.megaface_root, args.facescrub_root,
                        size=args.list_size, set_index=args.list_set, noises=args.noises,
                        crop=args.crop, num_workers=max(1, args.workers))
    rows: list[tuple[str, object]] = []
    for image_set, summary in summaries.items():
        rows += [(f"{image_set} list", summary["list"])]
        rows += [(f"{image_set} {key.replace('_', ' ')}", summary[key])
                 for key in summary if not key.endswith("_examples") and key != "list"]
        rows += [(f"  missing {path}", reason) for path, reason in summary["missing_examples"]]
        rows += [(f"  failed {path}", reason) for path, reason in summary["failed_examples"]]
    print(format_summary("MegaFace / FaceScrub", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
