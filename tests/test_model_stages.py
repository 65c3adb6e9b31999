"""Training, embedding and kNN on tiny inputs: data pipeline laws, checkpoints, contracts."""

import logging

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from workflow_scripts import embed, knn, models, synthetic, train
from workflow_scripts.io import read_embeddings

EOT = 49407


def test_mask_tokens_masks_the_exact_fraction_of_content_tokens():
    tokens = torch.zeros((3, 12), dtype=torch.long)
    for row, length in enumerate((10, 4, 1)):
        tokens[row, 0] = 49406
        tokens[row, 1 : length + 1] = torch.arange(100, 100 + length)
        tokens[row, length + 1] = EOT
    scores = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0))
    masked = train.mask_tokens(tokens, 0.5, EOT, scores)
    changed = (masked != tokens).sum(dim=1).tolist()
    assert changed == [5, 2, 0]  # round(0.5 * 10), round(0.5 * 4), round(0.5 * 1) = 0 (banker's rounding)
    assert (masked[:, 0] == 49406).all() and (masked == EOT).sum() == 3
    assert torch.equal(train.mask_tokens(tokens, 0.0, EOT, scores), tokens)
    assert torch.equal(masked, train.mask_tokens(tokens, 0.5, EOT, scores.clone()))


def test_masking_takes_end_of_text_and_padding_from_the_tokenizer():
    """A tokenizer whose end-of-text id is not its largest id (an HF tokenizer: [SEP] = 102, pad 1)."""

    class Inner:
        eos_token_id, pad_token_id = None, 1
        sep_token_id = 102

    class HFLike:
        tokenizer = Inner()

    eot, pad = train.special_token_ids(HFLike())
    assert (eot, pad) == (102, 1)
    tokens = torch.tensor([[101, 5000, 6000, 7000, 8000, 102, 1, 1]])  # content ids above the end-of-text id
    masked = train.mask_tokens(tokens, 0.5, eot, torch.tensor([[0.0, 0.1, 0.9, 0.2, 0.8, 0.0, 0.0, 0.0]]), pad)
    assert masked.tolist() == [[101, 1, 6000, 1, 8000, 102, 1, 1]]  # the two lowest-scored content tokens
    with pytest.raises(ValueError, match="end-of-text and padding ids"):
        train.special_token_ids(object())


def test_caption_draws_and_masks_depend_on_the_record_not_the_batch():
    rows = np.array([7, 3, 11])
    uniforms = train.record_uniforms(5, 2, rows, 4)
    assert np.array_equal(train.record_uniforms(5, 2, rows[::-1], 4), uniforms[::-1])
    assert not np.array_equal(train.record_uniforms(5, 3, rows, 4), uniforms)  # a new draw every epoch
    assert ((uniforms >= 0) & (uniforms < 1)).all()
    counts = np.array([3, 1, 2])
    seen = set()
    for epoch in range(50):
        drawn = train.draw_captions(counts, train.record_uniforms(0, epoch, np.arange(3), 1)[:, 0])
        assert ((drawn >= 0) & (drawn < counts)).all()
        seen.add(int(drawn[0]))
    assert seen == {0, 1, 2}  # every caption of a multi-caption record gets drawn


def test_epoch_batches_cover_every_record_once_across_processes():
    for world_size in (1, 2, 4):
        batches = [train.epoch_batches(103, 8, 1, 0, rank, world_size) for rank in range(world_size)]
        assert {len(b) for b in batches} == {12}  # the same number of steps on every process
        rows = np.concatenate([rows for per_rank in batches for _, rows in per_rank])
        assert len(rows) == 96 and len(np.unique(rows)) == 96
    assert np.array_equal(
        np.concatenate([r for _, r in train.epoch_batches(103, 8, 1, 0, 0, 1)]),
        np.concatenate([r for _, r in train.epoch_batches(103, 8, 1, 0, 0, 1)]),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    config = synthetic.SyntheticConfig(image_size=64)
    synthetic.generate("pool", 40, seed=1, config=config, out_dir=root / "pool")
    synthetic.generate("public", 24, seed=2, config=config, out_dir=root / "public")
    ids = pl.read_parquet(root / "pool" / "records.parquet")["id"]
    pl.DataFrame({"id": ids[:32]}).write_parquet(root / "A.parquet")
    pl.DataFrame({"id": ids[32:]}).write_parquet(root / "holdout.parquet")
    params = train.TrainingParams(epochs=2, batch_size=16, warmup_steps=1, save_epochs="1", threads=2)
    train.train(str(root / "pool" / "records.parquet"), str(root / "A.parquet"), root / "model", params)
    return root, params


def test_training_writes_checkpoints_and_log(tiny_run):
    root, _params = tiny_run
    log = pl.read_parquet(root / "model" / "train_log.parquet")
    assert log["epoch"].to_list() == [1, 2]
    assert set(log.columns) >= {"loss", "lr", "seconds", "logit_scale"}
    checkpoint = torch.load(root / "model" / "model.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["model_name"] == "dejavu-vit-tiny"
    assert torch.load(root / "model" / "model_epoch1.pt", weights_only=True)["epoch"] == 1
    assert not (root / "model" / "resume.pt").exists()


def test_fixed_temperature_freezes_the_logit_scale(tmp_path, tiny_run):
    root, _params = tiny_run
    fixed = train.TrainingParams(epochs=1, batch_size=16, warmup_steps=1, temperature=0.05, threads=2)
    train.train(str(root / "pool" / "records.parquet"), str(root / "A.parquet"), tmp_path, fixed)
    assert pl.read_parquet(tmp_path / "train_log.parquet")["logit_scale"][0] == pytest.approx(20.0)


def test_training_resumes_after_a_kill(tmp_path, tiny_run, monkeypatch, caplog):
    root, _ = tiny_run
    params = train.TrainingParams(epochs=2, batch_size=16, warmup_steps=1, threads=2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train, "write_parquet", killed)
        with pytest.raises(KeyboardInterrupt):
            train.train(str(root / "pool" / "records.parquet"), str(root / "A.parquet"), tmp_path, params)
    assert (tmp_path / "resume.pt").exists()
    with caplog.at_level(logging.INFO):
        train.train(str(root / "pool" / "records.parquet"), str(root / "A.parquet"), tmp_path, params)
    assert "resuming" in caplog.text
    assert pl.read_parquet(tmp_path / "train_log.parquet")["epoch"].to_list() == [1, 2]


def test_open_clip_train_checkpoint_format_loads(tmp_path, tiny_run):
    root, _ = tiny_run
    ours = torch.load(root / "model" / "model.pt", weights_only=True)
    foreign = {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in ours["state_dict"].items()}}
    torch.save(foreign, tmp_path / "epoch_2.pt")
    model, _, _, _ = models.load_checkpoint(tmp_path / "epoch_2.pt", torch.device("cpu"), "dejavu-vit-tiny")
    assert torch.equal(model.logit_scale, ours["state_dict"]["logit_scale"])
    with pytest.raises(ValueError, match="does not name its architecture"):
        models.load_checkpoint(tmp_path / "epoch_2.pt", torch.device("cpu"))


def test_embeddings_contract(tmp_path, tiny_run):
    root, _ = tiny_run
    model = str(root / "model" / "model.pt")
    params = embed.EmbedParams(batch_size=10)
    embed.embed(model, str(root / "public" / "records.parquet"), [], "image", str(tmp_path / "public.parquet"), params)
    embed.embed(
        model,
        str(root / "pool" / "records.parquet"),
        [str(root / "A.parquet"), str(root / "holdout.parquet")],
        "text",
        str(tmp_path / "captions.parquet"),
        params,
    )
    schema = pq.read_schema(tmp_path / "public.parquet")
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[64]"
    ids, vectors = read_embeddings(tmp_path / "captions.parquet")
    assert len(ids) == 40 and list(ids[:32]) == pl.read_parquet(root / "A.parquet")["id"].to_list()
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(40), abs=1e-5)
    knn.knn(str(tmp_path / "captions.parquet"), str(tmp_path / "public.parquet"), str(tmp_path / "nb.parquet"), k=5)
    neighbors = pl.read_parquet(tmp_path / "nb.parquet")
    assert neighbors.schema == {"query_id": pl.String, "rank": pl.Int16, "public_id": pl.String, "score": pl.Float32}
    assert neighbors.height == 40 * 5


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    public = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(70, 16)).astype(np.float32)
    public /= np.linalg.norm(public, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, rows = knn.search(queries, public, k=7, batch_size=16)
    similarity = queries @ public.T
    expected = np.argsort(-similarity, axis=1)[:, :7]
    assert np.array_equal(rows, expected)
    assert scores == pytest.approx(np.take_along_axis(similarity, expected, axis=1), abs=1e-5)


def test_gpu_requests_fail_loudly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(models.DeviceError, match="no GPU is visible"):
        models.select_device("cuda", allow_cpu_fallback=False)
    assert models.select_device("cuda", allow_cpu_fallback=True).type == "cpu"
    with pytest.raises(RuntimeError, match="faiss sees no GPU"):
        knn.search(np.ones((1, 4), np.float32), np.ones((2, 4), np.float32), k=1, use_gpu="always")


def _tiny_params(**changes) -> "train.TrainingParams":
    return train.TrainingParams(**{"epochs": 2, "batch_size": 16, "warmup_steps": 1, "threads": 2, **changes})


def _train(root, out_dir, params):
    train.train(str(root / "pool" / "records.parquet"), str(root / "A.parquet"), out_dir, params)


def test_fixed_temperature_below_0_01_is_kept(tmp_path, tiny_run):
    root, _ = tiny_run
    _train(root, tmp_path, _tiny_params(epochs=1, temperature=0.005))
    assert pl.read_parquet(tmp_path / "train_log.parquet")["logit_scale"][0] == pytest.approx(200.0)


def test_rerun_writes_model_pt_after_a_kill_past_the_last_resume_checkpoint(tmp_path, tiny_run, monkeypatch):
    """Killed after the final epoch's resume.pt, before the outputs were complete: Snakemake then removes
    model.pt as an incomplete output, and the rerun must write it again (it used to train zero epochs)."""
    root, _ = tiny_run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train, "write_parquet", killed)
        with pytest.raises(KeyboardInterrupt):
            _train(root, tmp_path, _tiny_params())
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["epoch"] == 2
    (tmp_path / "model.pt").unlink(missing_ok=True)
    _train(root, tmp_path, _tiny_params())
    assert torch.load(tmp_path / "model.pt", weights_only=True)["epoch"] == 2
    assert pl.read_parquet(tmp_path / "train_log.parquet")["epoch"].to_list() == [1, 2]


def test_a_save_epoch_added_after_a_kill_is_still_written(tmp_path, tiny_run, monkeypatch, caplog):
    """Killed after epoch 2 of 3, then epoch 1 joins save_epochs: resuming at 2 would never write epoch 1."""
    root, _ = tiny_run
    save = train.save_checkpoint

    def killed_after_epoch_2(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if path.name == "resume.pt" and kwargs["epoch"] == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train, "save_checkpoint", killed_after_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            _train(root, tmp_path, _tiny_params(epochs=3))
    assert not (tmp_path / "model_epoch1.pt").exists()
    with caplog.at_level(logging.WARNING):
        _train(root, tmp_path, _tiny_params(epochs=3, save_epochs="1"))
    assert "retraining from scratch" in caplog.text
    assert torch.load(tmp_path / "model_epoch1.pt", weights_only=True)["epoch"] == 1
    assert pl.read_parquet(tmp_path / "train_log.parquet")["epoch"].to_list() == [1, 2, 3]


def test_a_diverged_run_stops_naming_the_step_and_writes_no_model(tmp_path, tiny_run):
    root, _ = tiny_run
    with pytest.raises(train.TrainingDiverged, match=r"at epoch \d+, step \d+") as raised:
        _train(root, tmp_path, _tiny_params(lr=1e6, epochs=3))
    assert "no model written" in str(raised.value)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "train_log.parquet").exists()


def test_step_rows_and_options_train(tmp_path, tiny_run):
    """Step-level log every N steps; accumulation, clipping and gradient checkpointing run end to end."""
    root, _ = tiny_run
    _train(
        root,
        tmp_path,
        _tiny_params(log_every_steps=1, accumulation_steps=2, grad_clip_norm=1.0, grad_checkpointing=True),
    )
    steps = pl.read_parquet(tmp_path / train.STEPS_TABLE)
    assert steps["step"].to_list() == [1, 2, 3, 4] and steps["epoch"].to_list() == [1, 1, 2, 2]
    assert steps["loss"].is_finite().all()
    assert not (tmp_path / train.SIDE_TABLE).exists()


def test_accumulation_gives_the_whole_batch_gradient():
    """Micro-batches with cached features: same loss and gradients as one pass over the batch."""
    model, _, _ = models.create_model("dejavu-vit-tiny", torch.device("cpu"))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(images, size=model.visual.image_size)
    tokens = torch.randint(1, 1000, (8, model.context_length), generator=torch.Generator().manual_seed(1))
    loss_fn, scaler = train.ClipLoss(), torch.amp.GradScaler("cpu", enabled=False)
    gradients = []
    for accumulation in (1, 4):
        model.zero_grad()
        loss = train.contrastive_backward(
            model, loss_fn, images, tokens, accumulation, __import__("contextlib").nullcontext, scaler
        )
        gradients.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_1, grads_1), (loss_4, grads_4) = gradients
    assert float(loss_4) == pytest.approx(float(loss_1), rel=1e-5)
    assert grads_1.keys() == grads_4.keys()
    for name in grads_1:
        assert torch.allclose(grads_4[name], grads_1[name], rtol=1e-3, atol=1e-6), name


def _ddp_command(root, out_dir, launcher: str) -> list[str]:
    import shlex
    import sys

    prefix = shlex.split(launcher)
    prefix[0] = sys.executable if prefix[0] == "python" else prefix[0]
    return [
        *prefix,
        "workflow_scripts.train",
        "--records",
        str(root / "pool" / "records.parquet"),
        "--split",
        str(root / "A.parquet"),
        "--out-dir",
        str(out_dir),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--warmup-steps",
        "1",
        "--device",
        "cpu",
        "--num-workers",
        "1",
        "--preload-images",
        "false",
    ]


def _check_ddp_outputs(out_dir):
    log = pl.read_parquet(out_dir / "train_log.parquet")
    assert log["epoch"].to_list() == [1, 2]
    assert '"world_size": 2' in pq.read_schema(out_dir / "train_log.parquet").metadata[b"dejavu:params"].decode()
    assert torch.load(out_dir / "model.pt", weights_only=True)["epoch"] == 2


def test_distributed_training_under_torchrun(tmp_path, tiny_run):
    """Two processes (gloo on the CPU) through the launcher's one-node command; rank 0 alone writes."""
    import subprocess

    from workflow_scripts import launch

    root, _ = tiny_run
    command = _ddp_command(root, tmp_path, launch.launch_command({"nodes": 1, "gpus_per_node": 2}))
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_ddp_outputs(tmp_path)


def test_distributed_training_as_srun_tasks(tmp_path, tiny_run):
    """What srun starts: one plain process per task with SLURM's variables; the rendezvous comes from them."""
    import os
    import subprocess

    from workflow_scripts import launch

    root, _ = tiny_run
    launcher = launch.launch_command({"nodes": 1, "gpus_per_node": 2, "use_srun": True})
    assert launcher.startswith("srun ") and launcher.endswith(" python -m")
    command = _ddp_command(root, tmp_path, "python -m")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "MASTER_"))}
    env.update(SLURM_NTASKS="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost")
    tasks = [
        subprocess.Popen(
            command,
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    _check_ddp_outputs(tmp_path)
