"""Face identification: enrol people into a gallery, calibrate its threshold, identify the faces of images.

    python -m sparse_embed.app enroll --gallery=gallery --model=runs/sparse_mfn --images=people
    python -m sparse_embed.app enroll --gallery=gallery --list=more_people.csv
    python -m sparse_embed.app calibrate --gallery=gallery --pairs=pairs.txt --images=faces --far=1e-3
    python -m sparse_embed.app identify --gallery=gallery --output=out photos/ party.jpg door.mp4
    python -m sparse_embed.app list --gallery=gallery
    python -m sparse_embed.app remove --gallery=gallery --name=alice
    SPARSE_EMBED_APP_TOKEN=... python -m sparse_embed.app serve --gallery=gallery --host=127.0.0.1 --port=8080

`--images=PEOPLE` holds one folder per person (the folder name is the name);
`--list=CSV` has rows `image,name` (image paths relative to the CSV's folder).
Every enrolment image must show one face: an image with none or several, or
a file that is not an image, is reported and skipped. `--aligned` takes
aligned face crops without detection. Videos (by extension) are tracked
frame by frame: each track gets one identity, and the output adds an
annotated video and a timeline. A `.tflite` model needs `--mtcnn=DIR`
(the TFLite MTCNN of `python -m sparse_embed.faces.mtcnn_tflite`) and never
imports TensorFlow. The gallery records its model; `identify` and `calibrate`
use it unless `--model` is given, and a gallery refuses any other model.
`serve` answers identify, enrol and remove over HTTP with a web page (writes
need the bearer token of SPARSE_EMBED_APP_TOKEN or `--token_file`).
The App page of the documentation (docs/app.md) describes the gallery, the
report, the calibration and the service.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sparse_embed.app.embedder import (
    FLIP_MODES,
    LANDMARK_SOURCES,
    Embedder,
    LandnetDetector,
    RerankEmbedder,
    check_model_file,
    find_faces,
    is_tflite,
    load_detector,
)
from sparse_embed.app.gallery import (
    DEFAULT_MEAN_OF,
    INDEX_TYPES,
    MATCHING,
    Gallery,
    ModelRecord,
    RerankRecord,
    calibration_from_scores,
    short,
)
from sparse_embed.app.identify import (
    UNKNOWN,
    VIDEO_EXTENSIONS,
    Settings,
    annotate,
    annotated_name,
    collect_inputs,
    identify_faces,
)
from sparse_embed.app.quality import QualityGate
from sparse_embed.app.video import (
    DEFAULT_IOU,
    DEFAULT_MAX_MISSED,
    VideoOptions,
    annotated_suffix,
    identify_video,
    is_video,
)
from sparse_embed.cli import add_command, make_parser, program, user_errors_exit
from sparse_embed.data import format_summary
from sparse_embed.edge.preprocess import decode
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry

# Sub-command -> handler of its parsed arguments.
COMMANDS: Registry[Callable[[argparse.Namespace], None]] = Registry("app command")
REPORT_NAME = "report.json"
ANNOTATED_DIR = "annotated"
# Problem images a summary names; the rest are counted.
SHOWN_PROBLEMS = 20


def _load_embedder(model: str, flip: str | None) -> Embedder:
    from sparse_embed.app.embedder import load_embedder

    check_model_file(model)
    return load_embedder(model, flip)


def _open(args: argparse.Namespace, matching: str | None = None) -> tuple[Gallery, Embedder]:
    """The gallery of --gallery and its model (--model or the recorded one), checked against each other
    and, before the model loads, against the `matching` it is to answer with."""
    gallery = Gallery.load(args.gallery)
    if matching is not None:
        gallery.check_matching(matching)
    model = args.model or gallery.model.model
    embedder = _load_embedder(model, gallery.model.flip)
    gallery.check_model(embedder.fingerprint, model)
    return gallery, _with_rerank(gallery, embedder)


def _with_rerank(gallery: Gallery, embedder: Embedder) -> Embedder:
    """The embedder a gallery takes: with a re-rank model (checked against its record), both."""
    record = gallery.rerank
    if record is None:
        return embedder
    dense = _load_embedder(record.model, record.flip)
    if dense.fingerprint != record.fingerprint:
        raise ConfigError(f"gallery {gallery.directory} re-ranks with {record.model} (fingerprint "
                          f"{short(record.fingerprint)}), which now has fingerprint "
                          f"{short(dense.fingerprint)}: its weights changed since enrolment; enrol into a "
                          "new gallery")
    return RerankEmbedder(embedder, dense)


def _detector(args: argparse.Namespace, gallery: Gallery | None, model: str):
    if args.aligned:
        return None
    mtcnn = args.mtcnn or (gallery.model.mtcnn if gallery is not None else None)
    detector = load_detector(mtcnn, is_tflite(model))
    if args.landmarks == "mtcnn":
        return detector
    if not args.landnet:
        raise ConfigError("--landmarks=landnet needs --landnet=RUN_DIR_OR_TFLITE (a run of "
                          "python -m sparse_embed.landmarks train, or a .tflite of it)")
    return LandnetDetector(detector, args.landnet)


def _one_face(path: str, detector, embedder: Embedder,
              gate: QualityGate | None = None) -> tuple[np.ndarray | None, str | None]:
    """(aligned crop, None) of an image showing one face that passes the gate's detection bars,
    or (None, why it is skipped)."""
    image = decode(path)
    if image is None:
        return None, "not a decodable image"
    faces = find_faces(image, detector, embedder.width, embedder.height)
    if not faces:
        return None, "no face found"
    if len(faces) > 1:
        return None, f"{len(faces)} faces, one expected"
    face = faces[0]
    problem = None if gate is None else gate.face_problem(face.box, face.landmarks, face.confidence)
    if problem is not None:
        return None, problem
    return face.crop, None


def _people_folder(root: Path) -> list[tuple[str, str]]:
    if not root.is_dir():
        raise DataError(f"--images {root} is not a directory (one folder per person)")
    items = [(str(f), person.name) for person in sorted(root.iterdir()) if person.is_dir()
             for f in sorted(person.iterdir()) if f.is_file() and not f.name.startswith(".")]
    if not items:
        raise DataError(f"--images {root} holds no person folder with files (one folder per person)")
    return items


def _people_list(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DataError(f"--list {path} not found")
    items = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{lineno}: expected 'image,name', got {','.join(row)!r}")
            image, name = (cell.strip() for cell in row)
            if lineno == 1 and (image, name) == ("image", "name"):
                continue
            items.append((str(path.parent / image), name))
    if not items:
        raise DataError(f"--list {path} has no 'image,name' rows")
    return items


def _problems(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rows = [(f"  skipped {path}", why) for path, why in skipped[:SHOWN_PROBLEMS]]
    if len(skipped) > SHOWN_PROBLEMS:
        rows.append(("  ...", f"{len(skipped) - SHOWN_PROBLEMS} more"))
    return rows


def _confident(crops: dict[str, list[tuple[str, np.ndarray]]], embedder: Embedder, gate: QualityGate,
               skipped: list[tuple[str, str]]) -> dict[str, list[tuple[str, np.ndarray]]]:
    """The crops whose predicted confidence passes the gate; the others join `skipped` with why."""
    kept: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, faces in crops.items():
        confidence = embedder.confidence([crop for _, crop in faces])
        for (path, crop), value in zip(faces, confidence, strict=True):
            problem = gate.confidence_problem(float(value))
            if problem is None:
                kept.setdefault(name, []).append((path, crop))
            else:
                skipped.append((path, problem))
    return kept


@COMMANDS.register("enroll")
def _enroll(args: argparse.Namespace) -> None:
    if (args.images is None) == (args.list is None):
        raise ConfigError("enroll needs --images=PEOPLE_DIR or --list=CSV (one of them)")
    gate = QualityGate(args.min_face_px, args.min_detector_score, args.check_landmarks, args.min_confidence)
    items = _people_folder(Path(args.images)) if args.images else _people_list(Path(args.list))
    if Gallery.exists(args.gallery):
        gallery = Gallery.load(args.gallery)
        if args.flip and args.flip != gallery.model.flip:
            raise ConfigError(f"gallery {args.gallery} embeds with flip {gallery.model.flip}, "
                              f"not {args.flip}")
        if args.index_type and args.index_type != gallery.model.index_type:
            raise ConfigError(f"gallery {args.gallery} has a {gallery.model.index_type} index, "
                              f"not {args.index_type}")
        if args.keep_means and gallery.means is None:
            raise ConfigError(f"gallery {args.gallery} keeps no person means: --keep_means is a new "
                              "gallery's choice (enrol into a new gallery)")
        recorded = gallery.rerank.model if gallery.rerank is not None else None
        if args.rerank_model and args.rerank_model != recorded:
            raise ConfigError(f"gallery {args.gallery} re-ranks with {recorded or 'no model'}, not "
                              f"{args.rerank_model}: --rerank_model is a new gallery's choice")
        model = args.model or gallery.model.model
        embedder = _load_embedder(model, gallery.model.flip)
        gallery.check_model(embedder.fingerprint, model)
        embedder = _with_rerank(gallery, embedder)
    else:
        if not args.model:
            raise ConfigError(f"{args.gallery} is a new gallery: pass --model=RUN_DIR or "
                              "--model=MODEL.tflite")
        model = args.model
        embedder = _load_embedder(model, args.flip)
        rerank = None
        if args.rerank_model:
            dense = _load_embedder(args.rerank_model, None)
            rerank = RerankRecord(dense.fingerprint, args.rerank_model, dense.embedding_size, dense.flip)
        gallery = Gallery.create(args.gallery, ModelRecord(
            embedder.fingerprint, model, args.mtcnn, embedder.width, embedder.height, embedder.embedding_size,
            embedder.flip, args.index_type or ("sparse" if embedder.sparse else "dense")), args.keep_means,
            rerank)
        if rerank is not None:
            embedder = RerankEmbedder(embedder, dense)
    if gate.min_confidence is not None and not embedder.has_confidence:
        raise ConfigError(f"--min_confidence needs a model that predicts a confidence (a probabilistic "
                          f"run or its export); {model} does not")
    detector = _detector(args, gallery, model)
    crops: dict[str, list[tuple[str, np.ndarray]]] = {}
    skipped = []
    for path, name in tqdm(items, desc="enroll", unit="img", leave=False, disable=None):
        crop, why = _one_face(path, detector, embedder, gate)
        if crop is None:
            skipped.append((path, why))
        else:
            crops.setdefault(name, []).append((path, crop))
    if gate.min_confidence is not None:
        crops = _confident(crops, embedder, gate, skipped)
    if not crops:
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"nothing to enrol: {len(skipped)} image(s) skipped{first}; the gallery is unchanged")
    new = [name for name in crops if name not in gallery.people]
    for name, faces in crops.items():
        gallery.enroll(name, embedder.embed([crop for _, crop in faces]), [path for path, _ in faces])
    gallery.save()
    counts = gallery.counts()
    rows = [("gallery", args.gallery),
            ("model", f"{gallery.model.model} ({short(gallery.model.fingerprint)})"),
            *([("re-rank model", f"{gallery.rerank.model} ({short(gallery.rerank.fingerprint)})")]
              if gallery.rerank is not None else []),
            ("people enrolled", len(crops)), ("new people", len(new)),
            ("embeddings added", sum(len(faces) for faces in crops.values())),
            ("people in gallery", len(counts)), ("embeddings in gallery", sum(counts.values())),
            ("skipped images", len(skipped)), *_problems(skipped)]
    print(format_summary("enroll", rows))


@COMMANDS.register("remove")
def _remove(args: argparse.Namespace) -> None:
    gallery = Gallery.load(args.gallery)
    removed = gallery.remove(args.name)
    gallery.save()
    print(f"removed {args.name} ({removed} embeddings) from {args.gallery}: "
          f"{len(gallery.people)} people left")


@COMMANDS.register("list")
def _list(args: argparse.Namespace) -> None:
    gallery = Gallery.load(args.gallery)
    model = gallery.model
    calibration = gallery.calibration
    status = ("uncalibrated" if calibration is None
              else f"FAR {calibration.far:.2g} on {calibration.pairs} (asked {calibration.far_target:g})")
    print(f"gallery {args.gallery}: model {model.model} ({short(model.fingerprint)}), "
          f"{model.embedding_size}-d, flip {model.flip}, {model.index_type} index"
          f"{' with person means' if gallery.means is not None else ''}"
          f"{f', re-ranked by {gallery.rerank.model}' if gallery.rerank is not None else ''}, "
          f"threshold {gallery.threshold:.4f} ({status})")
    counts = gallery.counts()
    width = max([len("person"), *map(len, counts)])
    print(f"{'person':<{width}}  embeddings")
    for name, count in counts.items():
        print(f"{name:<{width}}  {count}")
    print(f"{len(counts)} people, {sum(counts.values())} embeddings")


@COMMANDS.register("identify")
def _identify(args: argparse.Namespace) -> None:
    if args.mean_of < 1:
        raise ConfigError(f"--mean_of must be >= 1, got {args.mean_of}")
    options = VideoOptions(args.every, args.max_missed, args.iou)
    # The enrolment gate's range checks, for the same two bars.
    QualityGate(min_face_px=args.min_face_px, min_detector_score=args.min_detector_score)
    files = collect_inputs(args.inputs)
    gallery, embedder = _open(args, args.matching)
    detector = _detector(args, gallery, args.model or gallery.model.model)
    settings = Settings(args.matching, args.mean_of, args.score_threshold, args.min_face_px,
                        args.min_detector_score)
    out = Path(args.output)
    (out / ANNOTATED_DIR).mkdir(parents=True, exist_ok=True)
    report, used, undecodable = [], set(), []
    for path in tqdm(files, desc="identify", unit="file", leave=False, disable=None):
        if is_video(path):
            name = annotated_name(path, used, annotated_suffix(path))
            entry = identify_video(path, gallery, embedder, detector, out, f"{ANNOTATED_DIR}/{name}",
                                   settings, options)
            if "error" in entry:
                undecodable.append((str(path), entry["error"]))
            report.append(entry)
            continue
        image = decode(path)
        if image is None:
            undecodable.append((str(path), "not a decodable image"))
            report.append({"input": str(path), "faces": [], "error": "not a decodable image"})
            continue
        faces = identify_faces(image, gallery, embedder, detector, settings)
        name = annotated_name(path, used)
        with atomic_path(out / ANNOTATED_DIR / name) as tmp:
            annotate(image, faces).save(tmp, format="JPEG", quality=90)
        report.append({"input": str(path), "faces": faces, "annotated": f"{ANNOTATED_DIR}/{name}"})
    with atomic_path(out / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    faces = [face for entry in report for face in entry["faces"]]
    named = sum(face["name"] != UNKNOWN for face in faces)
    threshold = gallery.threshold if settings.threshold is None else settings.threshold
    videos = [entry for entry in report if "timeline" in entry]
    rows = [("inputs", len(files)), *([("videos", len(videos)),
                                       ("tracks", sum(len(entry["timeline"]) for entry in videos))]
                                      if videos else []),
            ("faces", len(faces)), ("named", named), ("unknown", len(faces) - named),
            ("threshold", f"{threshold:.4f}"), ("not decodable", len(undecodable)), *_problems(undecodable),
            ("report", out / REPORT_NAME)]
    print(format_summary("identify", rows))


@COMMANDS.register("calibrate")
def _calibrate(args: argparse.Namespace) -> None:
    from sparse_embed.data.verification import read_pairs, unique_images

    if not 0 < args.far <= 1:
        raise ConfigError(f"--far must lie in (0, 1], got {args.far}")
    pairs = read_pairs(args.pairs, args.images)
    gallery, embedder = _open(args)
    detector = _detector(args, gallery, args.model or gallery.model.model)
    paths, left, right = unique_images(pairs)
    crops, skipped = {}, []
    for i, path in enumerate(tqdm(paths, desc="calibrate", unit="img", leave=False, disable=None)):
        crop, why = _one_face(path, detector, embedder)
        if crop is None:
            skipped.append((path, why))
        else:
            crops[i] = crop
    good = np.array([i in crops for i in range(len(paths))], bool)
    usable = good[left] & good[right]
    if not usable.any():
        raise DataError(f"no pair of {args.pairs} has a face in both images; {len(skipped)} image(s) skipped")
    order = sorted(crops)
    emb = np.zeros((len(paths), embedder.embedding_size), np.float32)
    emb[order] = embedder.embed([crops[i] for i in order])
    scores = gallery.pair_scores(emb[left[usable]], emb[right[usable]])
    calibration = calibration_from_scores(scores, pairs.issame[usable], args.far, args.pairs,
                                          skipped=int((~usable).sum()))
    gallery.calibrate(calibration)
    gallery.save()
    rows = [("gallery", args.gallery), ("pairs", f"{calibration.same_pairs} same, "
                                                  f"{calibration.different_pairs} different"),
            ("skipped pairs", calibration.skipped_pairs), *_problems(skipped),
            ("FAR asked", f"{args.far:g}"), ("threshold", f"{calibration.threshold:.4f}"),
            ("FAR there", f"{calibration.far:.3g}"), ("TAR there", f"{calibration.tar:.4f}")]
    if calibration.different_pairs * args.far < 1:
        rows.append(("note", f"{calibration.different_pairs} different pairs cannot measure a FAR of "
                             f"{args.far:g}: the threshold is above every different pair's score"))
    print(format_summary("calibrate", rows))


@COMMANDS.register("serve")
def _serve(args: argparse.Namespace) -> None:
    from sparse_embed.app.live import LiveGallery, listen, read_token

    token = read_token(args.token_file)
    if args.protect_identify and token is None:
        raise ConfigError("--protect_identify needs a token: set SPARSE_EMBED_APP_TOKEN or pass --token_file")
    if not args.max_upload_mb > 0 or not args.max_megapixels > 0:
        raise ConfigError(f"--max_upload_mb and --max_megapixels must be > 0, got {args.max_upload_mb} and "
                          f"{args.max_megapixels}")
    if args.mean_of < 1:
        raise ConfigError(f"--mean_of must be >= 1, got {args.mean_of}")
    QualityGate(min_face_px=args.min_face_px, min_detector_score=args.min_detector_score)
    try:
        from sparse_embed.app.serve import ServiceConfig, create_app, run_server
    except ImportError as e:
        raise ConfigError(f"serve needs the app extra ({e}): pip install 'sparse-embed[app]'") from None
    Gallery.load(args.gallery)  # a missing gallery is one line before the model loads
    sock = listen(args.host, args.port)
    gallery, embedder = _open(args, args.matching)
    detector = _detector(args, gallery, args.model or gallery.model.model)
    live = LiveGallery(args.gallery, embedder.fingerprint, embedder.model)
    config = ServiceConfig(token, args.protect_identify, args.max_upload_mb, args.max_megapixels,
                           Settings(args.matching, args.mean_of, args.score_threshold, args.min_face_px,
                                    args.min_detector_score))
    host, port = sock.getsockname()[:2]
    print(f"serving gallery {args.gallery} ({len(gallery.people)} people) on http://{host}:{port}/ "
          f"(changes: {'token' if token else 'read-only'}; identify: "
          f"{'token' if args.protect_identify else 'open'})", flush=True)
    run_server(create_app(live, embedder, detector, config), sock)


def _matching_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matching", choices=MATCHING, default="best",
                        help="A person's score: the best of their embeddings, the mean of the --mean_of "
                             "best, or the score of their mean embedding (centroid: a gallery enrolled "
                             "with --keep_means) (default: %(default)s).")
    parser.add_argument("--mean_of", type=int, default=DEFAULT_MEAN_OF,
                        help="Embeddings averaged per person with --matching=mean (default: %(default)s).")
    parser.add_argument("--score_threshold", type=float, default=None,
                        help="Name a face only above this score; default: the gallery's threshold.")
    parser.add_argument("--min_face_px", type=float, default=None,
                        help="Ignore detections whose box's shorter side is below this many pixels "
                             "(default: none ignored).")
    parser.add_argument("--min_detector_score", type=float, default=None,
                        help="Ignore detections MTCNN scores below this, in [0, 1] (default: none ignored).")


def _model_arguments(parser: argparse.ArgumentParser, new_gallery: bool = False) -> None:
    parser.add_argument("--gallery", required=True, help="The gallery directory.")
    parser.add_argument("--model", default=None,
                        help="Run directory or .tflite model" + (
                            " (required for a new gallery; default: the gallery's)." if new_gallery
                            else "; default: the one the gallery records."))
    parser.add_argument("--aligned", action="store_true",
                        help="The images are aligned face crops already: no detection.")
    parser.add_argument("--mtcnn", default=None,
                        help="Detect with the TFLite MTCNN in this directory (pnet/rnet/onet.tflite); "
                             "needed with a .tflite model. Default: the gallery's, else the mtcnn package.")
    parser.add_argument("--landmarks", choices=LANDMARK_SOURCES, default="mtcnn",
                        help="Points the alignment uses: MTCNN's own, or Landnet's on MTCNN's box "
                             "(needs --landnet). Default: %(default)s.")
    parser.add_argument("--landnet", default=None,
                        help="With --landmarks=landnet: a landmarks run directory or its .tflite file "
                             "(python -m sparse_embed.landmarks).")


def _add_commands(commands: argparse._SubParsersAction, prog: str) -> None:
    enroll = add_command(commands, "enroll", "Enrol people (new ones, or more images of enrolled ones).",
                         prog=f"{prog} enroll")
    _model_arguments(enroll, new_gallery=True)
    source = enroll.add_mutually_exclusive_group()
    source.add_argument("--images", default=None, help="Folder with one sub-folder of images per person.")
    source.add_argument("--list", default=None, help="CSV file of image,name rows.")
    enroll.add_argument("--flip", choices=FLIP_MODES, default=None,
                        help="Flip mode of a new gallery; default: the run's eval.flip (.tflite: concat).")
    enroll.add_argument("--index_type", choices=sorted(INDEX_TYPES), default=None,
                        help="Index of a new gallery; default: sparse for a sparse model, else dense.")
    enroll.add_argument("--rerank_model", default=None,
                        help="A new sparse gallery also keeps a dense model's embeddings (run directory or "
                             ".tflite, same input size) and re-ranks each face's best rows with them; its "
                             "scores are then that model's.")
    enroll.add_argument("--keep_means", action="store_true",
                        help="A new gallery also keeps each person's normalised mean embedding, kept "
                             "current as people are enrolled and removed (for --matching=centroid).")
    gate = enroll.add_argument_group("quality gate", "Refuse faces below a bar (reported with the reason "
                                                     "and skipped); each bar is off unless given.")
    gate.add_argument("--min_face_px", type=float, default=None,
                      help="Smallest shorter side of the face box, pixels.")
    gate.add_argument("--min_detector_score", type=float, default=None,
                      help="Smallest MTCNN confidence, in [0, 1].")
    gate.add_argument("--check_landmarks", action="store_true",
                      help="The five points must look frontal: in the box, in left-right order, eyes above "
                           "nose above mouth, eyes apart.")
    gate.add_argument("--min_confidence", type=float, default=None,
                      help="Smallest confidence the model predicts for the embedding (a probabilistic run, "
                           "or its .tflite export with a confidence output).")

    identify = add_command(commands, "identify", "Name the faces of images and videos (files or folders).",
                           prog=f"{prog} identify")
    _model_arguments(identify)
    identify.add_argument("--output", required=True, help="Folder for report.json and the annotated images.")
    _matching_arguments(identify)
    identify.add_argument("--every", type=int, default=1,
                          help="Videos: process every N-th frame (default: %(default)s, all).")
    identify.add_argument("--max_missed", type=int, default=DEFAULT_MAX_MISSED,
                          help="Videos: processed frames a face may go undetected before its track ends "
                               "(default: %(default)s).")
    identify.add_argument("--iou", type=float, default=DEFAULT_IOU,
                          help="Videos: smallest IoU linking a face to a track's predicted box "
                               "(default: %(default)s).")
    identify.add_argument("inputs", nargs="+",
                          help=f"Image files, video files ({', '.join(VIDEO_EXTENSIONS)}) and folders.")

    calibrate = add_command(commands, "calibrate",
                            "Set the gallery's threshold at a false-accept rate on verification pairs.",
                            prog=f"{prog} calibrate")
    _model_arguments(calibrate)
    calibrate.add_argument("--pairs", required=True, help="LFW-format pairs file of your own images.")
    calibrate.add_argument("--images", required=True, help="Image root of --pairs (one folder per identity).")
    calibrate.add_argument("--far", type=float, default=1e-3,
                           help="False-accept rate (default: %(default)s).")

    remove = add_command(commands, "remove", "Remove a person and all their embeddings.",
                         prog=f"{prog} remove")
    remove.add_argument("--gallery", required=True, help="The gallery directory.")
    remove.add_argument("--name", required=True, help="The person to remove.")

    serve = add_command(commands, "serve", "Serve identify, enrol and remove over HTTP, with a web page.",
                        prog=f"{prog} serve")
    _model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: %(default)s).")
    serve.add_argument("--port", type=int, default=8080, help="Port to listen on (default: %(default)s).")
    serve.add_argument("--token_file", default=None,
                       help="File holding the bearer token that changes need; default: "
                            "$SPARSE_EMBED_APP_TOKEN; with neither the service is read-only.")
    serve.add_argument("--protect_identify", action="store_true",
                       help="POST /identify needs the token too (default: open).")
    serve.add_argument("--max_upload_mb", type=float, default=10.0,
                       help="Largest image file accepted, MiB (default: %(default)s; larger: 413).")
    serve.add_argument("--max_megapixels", type=float, default=50.0,
                       help="Largest image accepted, millions of pixels, read from the file's header "
                            "before decoding (default: %(default)s; larger: 413).")
    _matching_arguments(serve)

    listing = add_command(commands, "list", "List the enrolled people and their embedding counts.",
                          prog=f"{prog} list")
    listing.add_argument("--gallery", required=True, help="The gallery directory.")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.app`: one sub-command per task."""
    parser = make_parser(__doc__, program("sparse_embed.app"))
    commands = parser.add_subparsers(dest="command", required=True, title="sub-commands")
    _add_commands(commands, parser.prog)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Runs one sub-command.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    COMMANDS.get(args.command)(args)


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
