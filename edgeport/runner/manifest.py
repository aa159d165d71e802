"""The manifest contract, read the same way on the host and by every bundle's runner.py.

Python 3.6 syntax, standard library only (assembled into runner.py before the runner core).
A runner trusts nothing but manifest.json, so it refuses a manifest whose schema it does not
know and a bundle whose build failed its gates: the same rules `edgeport inspect`,
`edgeport validate` and `edgeport flash` apply on the host.
"""
import hashlib
import json
import os

SCHEMA = 2  # bumped with every change of the manifest's meaning; runner and host must agree exactly


class RunnerError(Exception):
    """A problem the user can act on: printed as one line, non-zero exit."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle_dir):
    path = os.path.join(bundle_dir, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise RunnerError("cannot read %s: %s" % (path, e)) from None
    if not isinstance(manifest, dict):
        raise RunnerError("%s is not an edgeport manifest (a JSON object is expected)" % path)
    return manifest


def schema_problem(manifest):
    """Why this code cannot read the manifest (an unknown schema), or None."""
    schema = manifest.get("schema")
    if schema == SCHEMA:
        return None
    if isinstance(schema, int) and schema > SCHEMA:
        return ("manifest schema %d is newer than this edgeport reads (%d); use the edgeport that built it"
                % (schema, SCHEMA))
    return ("manifest schema %r is not %d (an older or foreign bundle); rebuild it with this edgeport"
            % (schema, SCHEMA))


def failed_gates(manifest):
    """The reasons the build refused this bundle (its verdict), or [] when it may ship."""
    verdict = manifest.get("verdict") or {}
    if verdict.get("status") != "failed":
        return []
    return list(verdict.get("reasons") or ["the build marked it failed"])


def refusal(manifest, force=False):
    """One line saying why a bundle must not be used, or None. ``force`` waives a failed verdict only."""
    problem = schema_problem(manifest)
    if problem:
        return problem
    reasons = failed_gates(manifest)
    if reasons and not force:
        return ("this bundle FAILED its build gates (%s); it must not ship. Fix the build, or pass --force to "
                "use it anyway" % "; ".join(reasons))
    return None


def verify_files(bundle_dir, manifest):
    """[(file, problem)] for every file whose sha256 differs from the manifest or is missing."""
    bad = []
    for name, digest in sorted(manifest["files"].items()):
        path = os.path.join(bundle_dir, name)
        if not os.path.isfile(path):
            bad.append((name, "missing"))
        elif sha256_file(path) != digest:
            bad.append((name, "sha256 mismatch (modified after the build)"))
    return bad


def _npy_shape(path):
    """The shape in a .npy file's header (standard library only: the header is a Python literal)."""
    import ast

    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            return None
        major = ord(f.read(1))
        f.read(1)
        size = int.from_bytes(f.read(2 if major == 1 else 4), "little")
        header = ast.literal_eval(f.read(size).decode("latin1"))
    return list(header.get("shape", ())) if isinstance(header, dict) else None


def shape_problem(bundle_dir, manifest):
    """Why the manifest's input shape cannot be the model's, or None: the golden inputs were made by the build
    for the model, so an input shape (manifest inputs or preprocess) that differs from theirs was edited."""
    try:
        declared = list(manifest["inputs"][0]["shape"])
        pre = list(manifest["preprocess"]["shape"])
        first = manifest["golden"]["cases"][0]["input"]
    except (KeyError, IndexError, TypeError):
        return "manifest.json lacks the input shape or the golden cases; rebuild the bundle"
    try:
        golden = _npy_shape(os.path.join(bundle_dir, first))
    except (OSError, ValueError, SyntaxError):
        golden = None
    if golden is None:
        return None  # verify_files names a missing or damaged golden file
    for what, shape in (("inputs[0].shape", declared), ("preprocess.shape", pre)):
        if shape != golden:
            return ("manifest.json's %s %s is not the shape of %s (%s), which the build made for this model: the "
                    "manifest was edited after the build; restore it or rebuild the bundle"
                    % (what, "x".join(map(str, shape)), first, "x".join(map(str, golden))))
    return None
