"""MkDocs hooks (mkdocs.yml: hooks): the reference pages are generated from the code on every site build
(edgeport.reference), never written by hand, so they cannot drift from the parsers and the config's declarations."""
from __future__ import annotations

from typing import Any

GENERATED = {"reference/cli.md": "cli_markdown", "reference/config.md": "config_markdown"}


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference pages to the site's files."""
    from mkdocs.structure.files import File

    from edgeport import reference

    for path, function in GENERATED.items():
        files.append(File.generated(config, path, content=getattr(reference, function)()))
    return files
