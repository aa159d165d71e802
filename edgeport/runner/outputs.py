"""Runner part: where annotated frames and records go (window, video file, JSON lines).

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import json
import os
import sys

import cv2

from edgeport.runner.manifest import RunnerError


def draw_overlay(vis, fps_now, latency_ms):
    """The FPS and latency line at the bottom left of an annotated frame (in place)."""
    cv2.putText(vis, "%.1f FPS  %.1f ms" % (fps_now, latency_ms), (8, vis.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX,
                0.5, (0, 255, 255), 1)


class Outputs(object):
    """Window, video file and JSON lines; all optional."""

    def __init__(self, args):
        self.args = args
        self.show = not args.headless and bool(os.environ.get("DISPLAY") or sys.platform in ("win32", "darwin"))
        self.writer = None
        try:
            self.jsonf = sys.stdout if args.jsonl == "-" else (open(args.jsonl, "w") if args.jsonl else None)
        except (IOError, OSError) as e:
            raise RunnerError("--jsonl %s cannot be written (%s)" % (args.jsonl, e.strerror or e)) from None
        self.quit = False

    @property
    def draw(self):
        return self.show or bool(self.args.save)

    def emit(self, vis, record, fps_now):
        if vis is not None:
            draw_overlay(vis, fps_now, record["latency_ms"])
            if self.args.save:
                if self.writer is None:
                    ext = os.path.splitext(self.args.save)[1].lower()
                    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if ext in (".mp4", ".m4v", ".mov") else "MJPG"))
                    self.writer = cv2.VideoWriter(self.args.save, fourcc, self.args.fps or 30.0,
                                                  (vis.shape[1], vis.shape[0]))
                    if not self.writer.isOpened():
                        raise RunnerError("cannot write video %s (no encoder for it in this OpenCV; try .avi)"
                                          % self.args.save)
                self.writer.write(vis)
            if self.show:
                cv2.imshow("edgeport", vis)
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                    self.quit = True
        if self.jsonf:
            self.jsonf.write(json.dumps(record) + "\n")
            self.jsonf.flush()

    def close(self):
        if self.writer is not None:
            self.writer.release()
        if self.jsonf and self.jsonf is not sys.stdout:
            self.jsonf.close()
        if self.show:
            cv2.destroyAllWindows()
