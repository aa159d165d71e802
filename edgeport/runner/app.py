"""Runner part: the command line (selftest, run, bench) and its checks.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import argparse
import io
import os
import signal
import sys

import cv2

from edgeport.runner.bench import bench, leave_one_cpu
from edgeport.runner.images import DEFAULT_MAX_PIXELS, bound_opencv
from edgeport.runner.loop import run_loop
from edgeport.runner.manifest import (
    RunnerError,
    load_manifest,
    refusal,
    schema_problem,
    shape_problem,
    verify_files,
)
from edgeport.runner.selftest import selftest
from edgeport.runner.serve import (
    SERVE_MAX_BODY,
    SERVE_MAX_CLIENTS,
    STREAM_FPS,
    TOKEN_ENV,
    Service,
    is_loopback,
    parse_bind,
    serve_without_source,
)
from edgeport.runner.sources import FFMPEG_PREFIXES
from edgeport.runner.task import task_part

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def open_runtime(manifest, bundle_dir, device=None, threads=None, **options):
    """Replaced in runner.py by the bundle's backend part (defined after this file there)."""
    raise RunnerError("this runner has no backend part; rebuild the bundle")


# The open_runtime options the bundle's runtime honours; the backend part redefines it after this file.
RUNTIME_OPTIONS = ("device", "threads")
# Options only some tasks read (a task part lists the ones it honours in cli_options), with what they do.
TASK_OPTIONS = (("topk", "it lists the top classes of a classifier"),)


def check_options(args, manifest):
    """RunnerError for an option that cannot take effect on this bundle or source (never silently ignored)."""
    backend = manifest.get("backend", "?")
    for option, value in (("device", args.device), ("threads", args.threads), ("hint", args.hint)):
        if value is not None and option not in RUNTIME_OPTIONS:
            raise RunnerError("--%s has no effect on a %s bundle (its runtime takes only: %s)"
                              % (option, backend, ", ".join("--" + o for o in RUNTIME_OPTIONS) or "neither"))
    task = manifest["preprocess"].get("task")
    honoured = task_part(task).cli_options
    for option, why in TASK_OPTIONS:
        if getattr(args, option) is not None and option not in honoured:
            raise RunnerError("--%s has no effect on a %s model (%s)" % (option, task, why))
    check_output_paths(args)
    src = args.source or ""
    if args.decode_threads is not None and not (src.startswith(FFMPEG_PREFIXES) or os.path.isfile(src)):
        raise RunnerError("--decode-threads has no effect on %s (it sets FFmpeg's decoder threads for video files "
                          "and streams)" % src)
    check_serve_options(args)


def default_hint(args):
    """A video file or image folder is work to finish, with nothing waiting on real time: requests run side by
    side ("throughput"); a camera, a stream and the service keep the bundle's own hint (None)."""
    src = args.source or ""
    return "throughput" if not args.serve and (os.path.isfile(src) or os.path.isdir(src)) else None


SAVE_EXTS = (".mp4", ".m4v", ".mov", ".avi", ".mkv")


def check_output_paths(args):
    """RunnerError for a --jsonl or --save file that cannot be written, before any source is opened."""
    for flag, path in (("--jsonl", args.jsonl if args.jsonl != "-" else None), ("--save", args.save)):
        if not path:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise RunnerError("%s %s is a folder; give a file in it, e.g. %s" % (
                flag, path, os.path.join(path, "out.avi" if flag == "--save" else "frames.jsonl")))
        if not os.path.isdir(folder):
            raise RunnerError("%s %s: the folder %s does not exist; create it first" % (flag, path, folder))
        if not os.access(folder, os.W_OK):
            raise RunnerError("%s %s: no permission to write in %s" % (flag, path, folder))
    if args.save and os.path.splitext(args.save)[1].lower() not in SAVE_EXTS:
        raise RunnerError("--save %s: give a video file ending in %s" % (args.save, ", ".join(SAVE_EXTS)))


def check_serve_options(args):
    """RunnerError for a --serve option that cannot take effect."""
    if not args.serve:
        for option, given in (("token", args.token), ("no-token", args.no_token), ("no-source", args.no_source),
                              ("max-clients", args.max_clients != SERVE_MAX_CLIENTS),
                              ("max-upload-mb", args.max_upload_mb != SERVE_MAX_BODY / 1048576.0),
                              ("stream-fps", args.stream_fps != STREAM_FPS)):
            if given:
                raise RunnerError("--%s has no effect without --serve [HOST:]PORT" % option)
        return
    if args.bench or args.selftest:
        raise RunnerError("--serve runs the camera loop as a service; it does not combine with --%s"
                          % ("bench" if args.bench else "selftest"))
    try:
        host, _ = parse_bind(args.serve)
    except ValueError as e:
        raise RunnerError("--serve %s" % e) from None
    token = args.token or os.environ.get(TOKEN_ENV)
    if token and args.no_token:
        raise RunnerError("--no-token and a token (--token or $%s) contradict each other; give one" % TOKEN_ENV)
    if not token and not args.no_token and not is_loopback(host):
        raise RunnerError("--serve %s reaches beyond loopback: pass --token TOKEN (or set %s) so that only who "
                          "holds it sees the camera, or --no-token to serve it open" % (args.serve, TOKEN_ENV))
    if not args.max_upload_mb > 0:
        raise RunnerError("--max-upload-mb %g: give a size above 0" % args.max_upload_mb)


class Parser(argparse.ArgumentParser):
    """argparse with one error line (no usage block) and exit status 2; no abbreviated options (a typo such as
    --headles would otherwise run as --headless)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super(Parser, self).__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write("error: %s (see python runner.py --help)\n" % message)
        sys.exit(EXIT_USAGE)


def at_least(minimum):
    """An argparse type: an int of at least ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
        if value < minimum:
            raise argparse.ArgumentTypeError("%d is below %d" % (value, minimum))
        return value
    return parse


def seconds(text):
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % text) from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError("%s is not 0 or more" % text)
    return value


def megapixels_arg(text):
    """An argparse type: a number of megapixels above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of megapixels" % text) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("%s: give a number of megapixels above 0, e.g. 40" % text)
    return value


def build_parser(manifest):
    cam = manifest.get("camera") or {}
    p = Parser(
        description="edgeport camera runner for %s (%s, %s)" % (manifest["model"]["name"], manifest["target"],
                                                                manifest["precision"]),
        epilog="examples:\n  python runner.py --selftest\n  python runner.py synthetic:// --headless "
               "--max-frames 100 --jsonl -\n  python runner.py video.mp4 --save out.mp4 --headless\n"
               "  python runner.py video.mp4 --bench --max-frames 500\n"
               "  python runner.py 0 --headless --serve 8080          # then open http://127.0.0.1:8080/\n"
               "  EDGEPORT_TOKEN=s3cret python runner.py --serve 0.0.0.0:8080 --no-source",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=cam.get("source", "0"),
                   help="0 | /dev/videoN | v4l2://N | csi://N | rtsp://... | http(s)://... | video file | "
                        "image folder | synthetic:// (default: %(default)s)")
    p.add_argument("--selftest", action="store_true", help="verify hashes and golden outputs, then exit")
    p.add_argument("--bench", action="store_true", help="end-to-end FPS on the source next to inference-only FPS "
                                                        "on the same frames (--max-frames, default 300)")
    p.add_argument("--headless", action="store_true", help="no window")
    p.add_argument("--save", help="write the annotated video here (.mp4 or .avi)")
    p.add_argument("--jsonl", metavar="FILE", help="write one JSON line per frame to this file ('-' for stdout)")
    p.add_argument("--max-frames", type=at_least(0), default=0, help="stop after N frames (default 0: no limit)")
    p.add_argument("--duration", type=seconds, default=0, help="stop after this many seconds (default 0: no limit)")
    p.add_argument("--loop", action="store_true", help="replay a video file or image folder endlessly")
    p.add_argument("--width", type=at_least(0), default=cam.get("width", 0),
                   help="capture width to ask of a camera (default: the profile's; 0: the camera's own)")
    p.add_argument("--height", type=at_least(0), default=cam.get("height", 0),
                   help="capture height to ask of a camera (default: the profile's; 0: the camera's own)")
    p.add_argument("--fps", type=seconds, default=cam.get("fps", 0), help="camera frame rate to ask for")
    p.add_argument("--flip", action="store_true", help="mirror frames horizontally")
    p.add_argument("--topk", type=at_least(1), help="classes listed per frame (classification; default 5)")
    p.add_argument("--threads", type=at_least(0), default=None,
                   help="CPU inference threads (default: the runtime's choice, but one CPU is left to capture "
                        "and drawing; 0: the runtime's choice)")
    p.add_argument("--hint", choices=("latency", "throughput"),
                   help="OpenVINO's performance hint: throughput runs the requests in flight side by side on fewer "
                        "threads each, latency one at a time on all of them (default: throughput for a video file "
                        "or image folder, the bundle's own, latency, for cameras, streams and --serve)")
    p.add_argument("--decode-threads", type=at_least(0),
                   help="FFmpeg decoder threads for video files and streams (default 1: frame threading costs "
                        "CPU that inference needs and delays streams; 0: FFmpeg's choice)")
    p.add_argument("--bench-rounds", type=at_least(1), default=3,
                   help="--bench rounds; medians are reported (default 3)")
    p.add_argument("--requests", type=at_least(1),
                   default=int((manifest.get("runtime") or {}).get("async_requests", 2)),
                   help="inference requests in flight (default %(default)s)")
    p.add_argument("--reconnect", type=at_least(0), default=5,
                   help="reopen attempts for a lost live source (default 5)")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to open a stream or camera (default 5)")
    p.add_argument("--device", help="override the runtime device from the manifest (e.g. CPU)")
    p.add_argument("--force", action="store_true", help="use a bundle whose build failed its gates (debugging "
                                                        "only: it did not compute what the model computes)")
    p.add_argument("--serve", metavar="[HOST:]PORT",
                   help="serve the live view, /metrics, /healthz, /readyz and POST /infer over HTTP (binds "
                        "127.0.0.1 unless a host is given, e.g. 0.0.0.0:8080)")
    p.add_argument("--token", help="with --serve: the bearer token every endpoint but the probes requires "
                                   "(default: $%s; none: open to whoever reaches the port)" % TOKEN_ENV)
    p.add_argument("--no-token", action="store_true", help="with --serve beyond loopback: serve without a token "
                                                           "(anyone who reaches the port sees the camera)")
    p.add_argument("--no-source", action="store_true", help="with --serve: no camera; answer POST /infer only")
    p.add_argument("--max-clients", type=at_least(1), default=SERVE_MAX_CLIENTS,
                   help="with --serve: requests served at once, streams included; more get 503 (default "
                        "%(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=SERVE_MAX_BODY / 1048576.0,
                   help="with --serve: the largest POST /infer upload; larger ones get 413 (default %(default)g)")
    p.add_argument("--max-pixels", type=megapixels_arg, default=DEFAULT_MAX_PIXELS / 1e6, metavar="MP",
                   help="the largest image decoded, in megapixels, read from its header before decoding: POST /infer "
                        "answers 413 beyond it, an image folder skips such files (default %(default)g)")
    p.add_argument("--stream-fps", type=seconds, default=STREAM_FPS,
                   help="with --serve: the live view's frame rate at most; the camera loop keeps its own "
                        "(default %(default)g; 0: every frame)")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def serve(args, manifest, bundle_dir, rt):
    """--serve: the selftest, then the camera loop (or --no-source) with the HTTP service beside it."""
    host, port = parse_bind(args.serve)
    service = Service(manifest, args, host, port, token=args.token or os.environ.get(TOKEN_ENV),
                      max_clients=args.max_clients, max_body=int(args.max_upload_mb * 1048576),
                      stream_fps=args.stream_fps, max_pixels=int(args.max_pixels * 1e6))
    args.source_open = not args.no_source
    service.start()
    try:
        service.set_ready("engine", True, getattr(rt, "name", manifest.get("backend", "")))
        report = io.StringIO()
        ok = selftest(bundle_dir, manifest, lambda: rt, out=report)
        service.set_ready("selftest", ok, report.getvalue().strip().splitlines()[-1])
        if not ok:
            sys.stderr.write("warning: the selftest failed; /readyz answers 503:\n%s" % report.getvalue())
        if args.no_source:
            stop = {"flag": False}

            def on_signal(signum, _frame):
                stop["flag"] = True

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
            serve_without_source(args, manifest, rt, service, stop)
        else:
            run_loop(args, manifest, rt, service=service)
    finally:
        service.stop()
    return EXIT_OK


def main(argv=None, bundle_dir=None):
    bundle_dir = bundle_dir or os.path.dirname(os.path.abspath(__file__))
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    if not verbose and hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):  # our own message says it once
        levels = cv2.utils.logging
        levels.setLogLevel(getattr(levels, "LOG_LEVEL_SILENT", levels.LOG_LEVEL_ERROR))
    try:
        manifest = load_manifest(bundle_dir)
        problem = schema_problem(manifest)  # before anything reads the manifest's keys
        if problem:
            raise RunnerError(problem)
        args = build_parser(manifest).parse_args(argv)
        refused = refusal(manifest, args.force)
        if refused:
            raise RunnerError(refused)
        check_options(args, manifest)
        bound_opencv(int(args.max_pixels * 1e6))  # OpenCV's own limit too, for formats images.py does not parse
        edited = shape_problem(bundle_dir, manifest)
        if edited:
            raise RunnerError(edited)
        bad = verify_files(bundle_dir, manifest)
        if args.selftest:
            ok = selftest(bundle_dir, manifest, lambda: open_runtime(manifest, bundle_dir, args.device))
            return EXIT_OK if ok else EXIT_FAIL
        if bad:
            raise RunnerError("bundle files fail their sha256 check (%s); rebuild or re-copy the bundle"
                              % "; ".join("%s: %s" % b for b in bad))
        threads = leave_one_cpu() if args.threads is None else (args.threads or None)
        hint = {"hint": args.hint or default_hint(args)} if "hint" in RUNTIME_OPTIONS else {}
        rt = open_runtime(manifest, bundle_dir, args.device, threads, **hint)
        if args.bench:
            bench(args, manifest, rt, open_all=lambda: open_runtime(manifest, bundle_dir, args.device, None, **hint))
        elif args.serve:
            return serve(args, manifest, bundle_dir, rt)
        else:
            run_loop(args, manifest, rt)
        return EXIT_OK
    except RunnerError as e:
        sys.stderr.write("error: %s\n" % e)
        return EXIT_USAGE
    except Exception as e:  # one line for the user, the traceback with -v
        if verbose:
            raise
        sys.stderr.write("error: %s: %s (run with -v for the traceback)\n" % (type(e).__name__, e))
        return EXIT_FAIL
